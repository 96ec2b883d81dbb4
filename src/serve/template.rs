//! Chat templates: the model's `tokenizer.chat_template` (or `--chat-template`) rendered
//! with minijinja the way Hugging Face's `apply_chat_template` renders it with jinja2
//! (`trim_blocks` and `lstrip_blocks` on; `messages`, `add_generation_prompt`, `bos_token`,
//! `eos_token`; `raise_exception` and `strftime_now`; Python's str and dict methods).

use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use serde_json::{Map, Value as Json};

/// ChatML, what llama-server falls back to when a model has no template.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + \
'\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}\
{{ '<|im_start|>assistant\\n' }}{% endif %}";

const NAME: &str = "chat";

/// A compiled chat template with the model's BOS/EOS text.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is reported with its line.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.to_owned())
            .map_err(|e| format!("chat template: {}", describe(&e)))?;
        Ok(Self {
            env,
            source: source.to_owned(),
            bos: bos.to_owned(),
            eos: eos.to_owned(),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (OpenAI message objects, content already plain text); `extra`
    /// (the request's `chat_template_kwargs`) adds or overrides variables.
    pub fn render(
        &self,
        messages: &[Json],
        add_generation_prompt: bool,
        extra: &Map<String, Json>,
    ) -> Result<String, String> {
        let mut vars = Map::new();
        vars.insert("messages".into(), Json::Array(messages.to_vec()));
        vars.insert("add_generation_prompt".into(), add_generation_prompt.into());
        vars.insert("bos_token".into(), self.bos.clone().into());
        vars.insert("eos_token".into(), self.eos.clone().into());
        for (k, v) in extra {
            vars.insert(k.clone(), v.clone());
        }
        let t = self
            .env
            .get_template(NAME)
            .map_err(|e| format!("chat template: {}", describe(&e)))?;
        t.render(Value::from_serialize(&vars))
            .map_err(|e| format!("chat template: {}", describe(&e)))
    }
}

/// The error and the chain of causes (minijinja puts the template's own message there).
fn describe(e: &JinjaError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(&format!(": {c}"));
        src = c.source();
    }
    s
}

/// `raise_exception(msg)`: how HF templates refuse a conversation.
fn raise_exception(msg: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(fmt)`: the current UTC time with the common strftime fields (templates use
/// it for "Today Date: 26 Jul 2024"); an unknown field is kept as written.
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&fmt, secs)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

fn strftime(fmt: &str, unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let sod = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let wd = (days + 3).rem_euclid(7) as usize;
    let (hh, mm, ss) = (sod / 3600, sod / 60 % 60, sod % 60);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(m - 1) as usize] + d + i64::from(leap && m > 2);
    let mut out = String::new();
    let mut it = fmt.chars();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(f) = it.next() else {
            out.push('%');
            break;
        };
        let month = MONTHS[(m - 1) as usize];
        match f {
            'Y' => out.push_str(&y.to_string()),
            'y' => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            'm' => out.push_str(&format!("{m:02}")),
            'd' => out.push_str(&format!("{d:02}")),
            'e' => out.push_str(&format!("{d:>2}")),
            'j' => out.push_str(&format!("{yday:03}")),
            'B' => out.push_str(month),
            'b' | 'h' => out.push_str(&month[..3]),
            'A' => out.push_str(DAYS[wd]),
            'a' => out.push_str(&DAYS[wd][..3]),
            'H' => out.push_str(&format!("{hh:02}")),
            'I' => out.push_str(&format!("{:02}", (hh + 11) % 12 + 1)),
            'p' => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            'M' => out.push_str(&format!("{mm:02}")),
            'S' => out.push_str(&format!("{ss:02}")),
            '%' => out.push('%'),
            other => {
                out.push('%');
                out.push(other);
            }
        }
    }
    out
}

/// (year, month 1..=12, day 1..=31) of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chatml_and_hf_features() {
        let t = ChatTemplate::new(CHATML, "<s>", "</s>").unwrap();
        let msgs = [json!({"role": "user", "content": "Hi"})];
        assert_eq!(
            t.render(&msgs, true, &Map::new()).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        // trim_blocks / lstrip_blocks, str methods, bos_token, kwargs, loop controls.
        let src = "{{ bos_token }}\n  {% for m in messages %}\n{{ m.content.strip().upper() }}\
                   {% if m.role == 'user' %}{% break %}{% endif %}\n{% endfor %}\
                   {% if flag is defined %}[{{ flag }}]{% endif %}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let msgs = [
            json!({"role": "user", "content": "  a "}),
            json!({"role": "assistant", "content": "b"}),
        ];
        let mut kw = Map::new();
        kw.insert("flag".into(), json!(true));
        // Booleans print as Python prints them, as in jinja2.
        assert_eq!(t.render(&msgs, false, &kw).unwrap(), "<s>\nA[True]");
    }

    #[test]
    fn raise_exception_and_syntax_errors() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('roles must alternate') }}{% endif %}",
            "",
            "",
        )
        .unwrap();
        let e = t
            .render(
                &[json!({"role": "assistant", "content": "x"})],
                true,
                &Map::new(),
            )
            .unwrap_err();
        assert!(e.contains("roles must alternate"), "{e}");
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
    }

    #[test]
    fn strftime_fields() {
        // 2024-07-26 13:25:09 UTC, a Friday.
        let t = 1_722_000_309;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime("%A %B %e %H:%M:%S %j %I%p %% %q", t),
            "Friday July 26 13:25:09 208 01PM % %q"
        );
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
