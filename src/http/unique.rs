//! Duplicate object keys anywhere in a JSON body are refused. JSON leaves them undefined and
//! parsers differ (serde keeps the last value, many proxies and loggers the first), so a body
//! with a repeated key can mean one request to us and another to whatever read it on the way.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// Where the first duplicate key is, as a dotted path (`context.sanctions_hit`,
/// `requests[2].context.amount`), or why the body is not JSON at all.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    Duplicate(String),
    Invalid(String),
}

/// Walk the whole body once; `Ok` when no object in it repeats a key.
pub fn check(body: &[u8]) -> Result<(), Found> {
    let path = RefCell::new(Vec::new());
    let duplicate = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(body);
    let walked = Walk {
        path: &path,
        duplicate: &duplicate,
    }
    .deserialize(&mut de)
    .and_then(|()| de.end());
    match (duplicate.into_inner(), walked) {
        (Some(at), _) => Err(Found::Duplicate(at)),
        (None, Err(e)) => Err(Found::Invalid(e.to_string())),
        (None, Ok(())) => Ok(()),
    }
}

/// One step of the path to the value being walked.
enum Step<'de> {
    Key(Key<'de>),
    Index(usize),
}

/// An object key, borrowed from the body unless it had escapes.
enum Key<'de> {
    Borrowed(&'de str),
    Owned(String),
}

/// Keys are equal by their text, whichever way they were spelled in the body.
impl PartialEq for Key<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Key<'_> {
    fn as_str(&self) -> &str {
        match self {
            Self::Borrowed(s) => s,
            Self::Owned(s) => s,
        }
    }
}

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key::Borrowed(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key::Owned(v.to_owned()))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// Keys of one object compared one by one; past this many, a hash set takes over.
const LINEAR_KEYS: usize = 16;

struct Walk<'a, 'de> {
    path: &'a RefCell<Vec<Step<'de>>>,
    duplicate: &'a RefCell<Option<String>>,
}

impl Walk<'_, '_> {
    fn at(&self, key: &str) -> String {
        let mut out = String::new();
        for step in self.path.borrow().iter() {
            match step {
                Step::Key(k) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(k.as_str());
                }
                Step::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(key);
        out
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // Objects in requests are small; a linear scan beats hashing until they are not.
        let mut seen: Vec<Key<'de>> = Vec::new();
        let mut many: std::collections::HashSet<String> = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            let repeated = if seen.len() < LINEAR_KEYS {
                seen.contains(&key)
            } else {
                if many.is_empty() {
                    many.extend(seen.iter().map(|k| k.as_str().to_owned()));
                }
                !many.insert(key.as_str().to_owned())
            };
            if repeated {
                let at = self.at(key.as_str());
                let message = format!("duplicate key '{at}'");
                *self.duplicate.borrow_mut() = Some(at);
                return Err(de::Error::custom(message));
            }
            self.path.borrow_mut().push(Step::Key(key));
            let walked = map.next_value_seed(Walk {
                path: self.path,
                duplicate: self.duplicate,
            });
            if let Some(Step::Key(key)) = self.path.borrow_mut().pop() {
                if seen.len() < LINEAR_KEYS {
                    seen.push(key);
                }
            }
            walked?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0;
        loop {
            self.path.borrow_mut().push(Step::Index(index));
            let next = seq.next_element_seed(Walk {
                path: self.path,
                duplicate: self.duplicate,
            });
            self.path.borrow_mut().pop();
            if next?.is_none() {
                return Ok(());
            }
            index += 1;
        }
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_without_repeats_passes() {
        assert_eq!(
            check(br#"{"a": {"b": [1, {"c": 2, "d": 3}]}, "e": "a"}"#),
            Ok(())
        );
        assert_eq!(check(br#"[{"a": 1}, {"a": 2}]"#), Ok(()));
    }

    #[test]
    fn a_repeat_is_named_by_its_path_at_any_depth() {
        assert_eq!(
            check(br#"{"action": "x", "context": {"hit": true, "n": 1, "hit": false}}"#),
            Err(Found::Duplicate("context.hit".into()))
        );
        assert_eq!(
            check(br#"{"requests": [{}, {"context": {"m": {"k": 1, "k": 2}}}]}"#),
            Err(Found::Duplicate("requests[1].context.m.k".into()))
        );
        assert_eq!(
            check(br#"{"a": 1, "a": 1}"#),
            Err(Found::Duplicate("a".into()))
        );
    }

    #[test]
    fn escaped_and_plain_spellings_of_one_key_are_the_same_key() {
        assert_eq!(
            check(br#"{"hit": true, "h\u0069t": false}"#),
            Err(Found::Duplicate("hit".into()))
        );
    }

    #[test]
    fn a_repeat_among_many_keys_is_found_without_comparing_every_pair() {
        let mut body = String::from("{");
        for i in 0..5_000 {
            body.push_str(&format!("\"k{i}\": {i}, "));
        }
        body.push_str("\"k17\": 0}");
        assert_eq!(check(body.as_bytes()), Err(Found::Duplicate("k17".into())));
        let unique = body.replace("\"k17\": 0}", "\"last\": 0}");
        assert_eq!(check(unique.as_bytes()), Ok(()));
    }

    #[test]
    fn invalid_json_is_reported_as_invalid() {
        // What a lenient skip of an unread value would let through: a lone surrogate, an
        // out-of-range number, nesting past the parser's limit.
        assert!(matches!(
            check(br#"{"a": "\ud800", "b": 1}"#),
            Err(Found::Invalid(_))
        ));
        assert!(matches!(check(br#"{"a": 1e400}"#), Err(Found::Invalid(_))));
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(matches!(check(deep.as_bytes()), Err(Found::Invalid(_))));
        assert!(matches!(check(br#"{"a": "#), Err(Found::Invalid(_))));
        assert!(matches!(
            check(br#"{"a": 1} trailing"#),
            Err(Found::Invalid(_))
        ));
    }
}
