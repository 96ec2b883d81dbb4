//! Packing of `bits`-bit codes as one LSB-first bit stream over u32 words: code i starts at bit
//! `i·bits`, so 32 codes fill exactly `bits` words (a 3-bit code may straddle two words); the
//! bits past the last code stay zero.

use super::{check_bits, QuantError};
use crate::format::{words_for, WORD_BITS};

/// Packs `codes` into `out`, which must hold exactly `words_for(codes.len(), bits)` words.
pub fn pack_codes(codes: &[u8], bits: u32, out: &mut [u32]) -> Result<(), QuantError> {
    check_bits(bits)?;
    let need = words_for(codes.len() as u32, bits) as usize;
    if out.len() != need {
        return Err(QuantError::Length {
            what: "packed words",
            expected: need,
            got: out.len(),
        });
    }
    if let Some((index, &code)) = codes
        .iter()
        .enumerate()
        .find(|(_, &c)| u32::from(c) >> bits != 0)
    {
        return Err(QuantError::CodeRange { index, code, bits });
    }
    out.fill(0);
    for (i, &c) in codes.iter().enumerate() {
        let bit = i * bits as usize;
        let (w, sh) = (bit / WORD_BITS as usize, (bit % WORD_BITS as usize) as u32);
        out[w] |= u32::from(c) << sh;
        if sh + bits > WORD_BITS {
            out[w + 1] |= u32::from(c) >> (WORD_BITS - sh);
        }
    }
    Ok(())
}

/// Unpacks `out.len()` codes from `words`.
pub fn unpack_codes(words: &[u32], bits: u32, out: &mut [u8]) -> Result<(), QuantError> {
    check_bits(bits)?;
    let need = words_for(out.len() as u32, bits) as usize;
    if words.len() < need {
        return Err(QuantError::Length {
            what: "packed words",
            expected: need,
            got: words.len(),
        });
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = code_at(words, bits, i);
    }
    Ok(())
}

/// Code `i` of a packed run. `bits` must be valid and `i` in range (internal contract).
#[inline]
pub fn code_at(words: &[u32], bits: u32, i: usize) -> u8 {
    let bit = i * bits as usize;
    let (w, sh) = (bit / WORD_BITS as usize, (bit % WORD_BITS as usize) as u32);
    let mut x = words[w] >> sh;
    if sh + bits > WORD_BITS {
        x |= words[w + 1] << (WORD_BITS - sh);
    }
    (x & ((1 << bits) - 1)) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_2bit() {
        // 0,1,2,3 in the lowest byte LSB-first: 0b11_10_01_00 = 0xE4; the 17th code opens word 1.
        let mut codes = vec![0u8, 1, 2, 3];
        codes.extend([3u8; 12]);
        codes.push(2);
        let mut w = [0u32; 2];
        pack_codes(&codes, 2, &mut w).unwrap();
        assert_eq!(w, [0xFFFF_FFE4, 0x0000_0002]);
        assert_eq!(w[0].to_le_bytes(), [0xE4, 0xFF, 0xFF, 0xFF]);
    }

    #[test]
    fn golden_3bit() {
        // Eleven sevens: 33 one-bits; code 10 straddles, its top bit opens word 1.
        let mut w = [0u32; 2];
        pack_codes(&[7u8; 11], 3, &mut w).unwrap();
        assert_eq!(w, [0xFFFF_FFFF, 1]);
        // 32 codes fill exactly 3 words; code 21 (value 5 = 0b101) sits at bits 63..66.
        let mut codes = [0u8; 32];
        codes[21] = 5;
        let mut w3 = [0u32; 3];
        pack_codes(&codes, 3, &mut w3).unwrap();
        assert_eq!(w3, [0, 0x8000_0000, 0b10]);
        assert_eq!(code_at(&w3, 3, 21), 5);
        let mut w1 = [0u32; 1];
        pack_codes(&[1, 2, 3, 4, 5], 3, &mut w1).unwrap();
        assert_eq!(w1[0], 1 | 2 << 3 | 3 << 6 | 4 << 9 | 5 << 12);
        assert_eq!(w1[0], 0x0000_58D1);
    }

    #[test]
    fn golden_4bit() {
        let mut w = [0u32; 1];
        pack_codes(&[0x1, 0x2, 0x3, 0x4, 0x5, 0x6, 0x7, 0xF], 4, &mut w).unwrap();
        assert_eq!(w[0], 0xF765_4321);
        assert_eq!(w[0].to_le_bytes(), [0x21, 0x43, 0x65, 0xF7]);
    }

    #[test]
    fn roundtrip_all_widths() {
        for bits in 2..=4u32 {
            for n in [1usize, 7, 10, 11, 16, 17, 21, 32, 33, 64, 128, 131] {
                let codes: Vec<u8> = (0..n).map(|i| ((i * 7 + 3) % (1 << bits)) as u8).collect();
                let mut w = vec![0u32; words_for(n as u32, bits) as usize];
                pack_codes(&codes, bits, &mut w).unwrap();
                let mut back = vec![0u8; n];
                unpack_codes(&w, bits, &mut back).unwrap();
                assert_eq!(back, codes, "bits {bits} n {n}");
                // Bits past the last code must be zero (kernels rely on it).
                assert_eq!(w.len(), (n * bits as usize).div_ceil(32));
                let tail = (n * bits as usize) % 32;
                if tail != 0 {
                    assert_eq!(w[w.len() - 1] >> tail, 0);
                }
            }
        }
    }

    #[test]
    fn rejects_bad_input() {
        let mut w = [0u32; 1];
        assert_eq!(
            pack_codes(&[4], 2, &mut w),
            Err(QuantError::CodeRange {
                index: 0,
                code: 4,
                bits: 2
            })
        );
        assert!(matches!(
            pack_codes(&[0; 17], 2, &mut w),
            Err(QuantError::Length { .. })
        ));
        assert_eq!(pack_codes(&[0], 5, &mut w), Err(QuantError::Bits(5)));
        assert_eq!(pack_codes(&[0], 1, &mut w), Err(QuantError::Bits(1)));
        let mut out = [0u8; 17];
        assert!(matches!(
            unpack_codes(&w, 2, &mut out),
            Err(QuantError::Length { .. })
        ));
    }
}
