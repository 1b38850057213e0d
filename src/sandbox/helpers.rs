//! The helper library predicates may call beyond Rhai's allow-listed packages.
//!
//! Every helper is total and bounded: it returns an error value on bad input and never panics
//! (Rhai does not catch panics in registered functions), and its cost is at most linear in
//! arguments that the sandbox's size limits already bound. Timestamps are integers of Unix
//! seconds, as the evaluator binds `timestamp` attributes; time zones are IANA names.
//! `docs/predicates.md` documents each helper for authors.

use chrono::{DateTime, Datelike, Timelike, Utc};
use chrono_tz::Tz;
use rhai::{Array, Dynamic, Engine, EvalAltResult, ImmutableString, NativeCallContext, INT};

/// Prefix of every helper error, so the evaluator can tell them from other runtime errors.
pub(super) const ERROR_PREFIX: &str = "helper: ";

type HelperResult<T> = Result<T, Box<EvalAltResult>>;

fn fail<T>(message: String) -> HelperResult<T> {
    Err(format!("{ERROR_PREFIX}{message}").into())
}

fn zone(tz: &str) -> HelperResult<Tz> {
    match tz.parse::<Tz>() {
        Ok(zone) => Ok(zone),
        Err(_) => fail(format!("unknown time zone '{tz}'")),
    }
}

fn local(ts: INT, tz: &str) -> HelperResult<DateTime<Tz>> {
    let zone = zone(tz)?;
    match DateTime::<Utc>::from_timestamp(ts, 0) {
        Some(utc) => Ok(utc.with_timezone(&zone)),
        None => fail(format!("timestamp {ts} is out of range")),
    }
}

/// Hour of day (0–23) of a timestamp in a time zone.
fn hour_in(ts: INT, tz: &str) -> HelperResult<INT> {
    Ok(INT::from(local(ts, tz)?.hour()))
}

/// Minute of the hour (0–59) of a timestamp in a time zone.
fn minute_in(ts: INT, tz: &str) -> HelperResult<INT> {
    Ok(INT::from(local(ts, tz)?.minute()))
}

/// ISO weekday (1 = Monday … 7 = Sunday) of a timestamp in a time zone.
fn weekday_in(ts: INT, tz: &str) -> HelperResult<INT> {
    Ok(INT::from(local(ts, tz)?.weekday().number_from_monday()))
}

/// Whether a timestamp falls on a Saturday or Sunday in a time zone.
fn is_weekend_in(ts: INT, tz: &str) -> HelperResult<bool> {
    Ok(local(ts, tz)?.weekday().number_from_monday() >= 6)
}

/// The calendar date (`YYYY-MM-DD`) of a timestamp in a time zone.
fn date_in(ts: INT, tz: &str) -> HelperResult<ImmutableString> {
    Ok(local(ts, tz)?.format("%Y-%m-%d").to_string().into())
}

/// Whether the local hour of a timestamp is in `[start, end)`; a window with `start > end`
/// wraps midnight (22–6 is a night shift).
fn within_hours(ts: INT, tz: &str, start: INT, end: INT) -> HelperResult<bool> {
    if !(0..=24).contains(&start) || !(0..=24).contains(&end) {
        return fail(format!("hours must be within 0..=24, got {start}..{end}"));
    }
    let hour = INT::from(local(ts, tz)?.hour());
    Ok(if start <= end {
        start <= hour && hour < end
    } else {
        hour >= start || hour < end
    })
}

/// Parse an RFC 3339 timestamp (for constants in a predicate) into Unix seconds.
fn ts(text: &str) -> HelperResult<INT> {
    match DateTime::parse_from_rfc3339(text) {
        Ok(t) => Ok(t.timestamp()),
        Err(e) => fail(format!("'{text}' is not an RFC 3339 timestamp: {e}")),
    }
}

/// Whole hours from `a` to `b` (negative when `b` is earlier).
fn hours_between(a: INT, b: INT) -> HelperResult<INT> {
    match b.checked_sub(a) {
        Some(d) => Ok(d / 3600),
        None => fail("timestamp difference overflows".into()),
    }
}

/// Whole days from `a` to `b` (negative when `b` is earlier).
fn days_between(a: INT, b: INT) -> HelperResult<INT> {
    match b.checked_sub(a) {
        Some(d) => Ok(d / 86_400),
        None => fail("timestamp difference overflows".into()),
    }
}

/// The lower-cased domain of an e-mail address; an error when there is no `@`.
fn email_domain(address: &str) -> HelperResult<ImmutableString> {
    match address.rsplit_once('@') {
        Some((_, domain)) if !domain.is_empty() => Ok(domain.to_ascii_lowercase().into()),
        _ => fail(format!("'{address}' is not an e-mail address")),
    }
}

/// Whether a string is empty or only whitespace.
fn is_blank(text: &str) -> bool {
    text.trim().is_empty()
}

/// Equality of the scalar values predicates compare; values of different types are unequal.
fn same(a: &Dynamic, b: &Dynamic) -> bool {
    if let (Ok(x), Ok(y)) = (a.as_int(), b.as_int()) {
        return x == y;
    }
    if let (Ok(x), Ok(y)) = (a.as_float(), b.as_float()) {
        return x == y;
    }
    if let (Ok(x), Ok(y)) = (a.as_bool(), b.as_bool()) {
        return x == y;
    }
    if let (Some(x), Some(y)) = (
        a.read_lock::<ImmutableString>(),
        b.read_lock::<ImmutableString>(),
    ) {
        return x.as_str() == y.as_str();
    }
    false
}

/// The most element comparisons one list helper may make. A helper call is one operation to
/// the engine, so its own cost must be small next to the evaluation deadline.
pub(super) const MAX_COMPARISONS: usize = 65_536;

/// Element comparisons charged as one operation: a comparison costs a small fraction of an
/// engine operation, but a helper's work must count against the budgets all the same.
const COMPARISONS_PER_OPERATION: usize = 16;

fn comparisons(name: &str, items: &Array, set: &Array) -> HelperResult<()> {
    let n = items.len().saturating_mul(set.len());
    if n > MAX_COMPARISONS {
        return fail(format!(
            "{name}: {}×{} comparisons is over the limit of {MAX_COMPARISONS}",
            items.len(),
            set.len()
        ));
    }
    super::charge((n / COMPARISONS_PER_OPERATION) as u64);
    Ok(())
}

/// Whether any element of `items` is in `set`.
fn any_in(items: Array, set: Array) -> HelperResult<bool> {
    comparisons("any_in", &items, &set)?;
    Ok(items.iter().any(|i| set.iter().any(|s| same(i, s))))
}

/// Whether every element of `items` is in `set` (true for an empty `items`).
fn all_in(items: Array, set: Array) -> HelperResult<bool> {
    comparisons("all_in", &items, &set)?;
    Ok(items.iter().all(|i| set.iter().any(|s| same(i, s))))
}

/// Whether no element of `items` is in `set`.
fn none_in(items: Array, set: Array) -> HelperResult<bool> {
    comparisons("none_in", &items, &set)?;
    Ok(!items.iter().any(|i| set.iter().any(|s| same(i, s))))
}

/// `part` as a percentage of `whole`; an error when `whole` is zero.
fn percent_of(part: f64, whole: f64) -> HelperResult<f64> {
    if whole == 0.0 {
        return fail("percent_of: whole is zero".into());
    }
    Ok(part / whole * 100.0)
}

/// Lists up to this long are searched by `string_in` without a call per element. A call of
/// `==` counts as an operation (and checks the deadline); skipping it for a short list leaves
/// at most this many unaccounted comparisons per `in`, while a long list is scanned as the
/// engine scans it, under the operation limit and the deadline.
const DIRECT_SCAN_MAX: usize = 32;

/// `value in array` for a string `value`, with the meaning of the engine's own `in` (which
/// resolves and calls `==` once per element, a large part of evaluating the usual
/// `context.x in config.list`): in a short list a string element is compared here directly;
/// any other element, and every element of a long list, goes through `==` as before, where a
/// missing `==` between two types means unequal.
fn string_in(
    ctx: NativeCallContext,
    array: &mut Array,
    value: ImmutableString,
) -> HelperResult<bool> {
    let direct = array.len() <= DIRECT_SCAN_MAX;
    for item in array.iter_mut() {
        if let Some(s) = item.read_lock::<ImmutableString>().filter(|_| direct) {
            if *s == value {
                return Ok(true);
            }
            continue;
        }
        let mut other = Dynamic::from(value.clone());
        let equal = match ctx.call_native_fn_raw("==", true, &mut [item, &mut other]) {
            Ok(r) => r.as_bool().unwrap_or(false),
            // Only for an element that is not a string: the two types differ.
            Err(e) if matches!(&*e, EvalAltResult::ErrorFunctionNotFound(sig, ..) if sig.starts_with("==")) => {
                false
            }
            Err(e) => return Err(e),
        };
        if equal {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Rhai's `string.pad(len, padding)`, which never returns when `padding` is empty (it adds
/// nothing per turn of its loop, inside one operation, so no limit stops it). The same result
/// otherwise, the length refused before anything is allocated as Rhai refuses it, and an empty
/// padding leaves the string as it is.
fn pad_string(
    ctx: NativeCallContext,
    string: &mut ImmutableString,
    len: INT,
    padding: &str,
) -> HelperResult<()> {
    if len <= 0 || padding.is_empty() {
        return Ok(());
    }
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    let max = ctx.engine().max_string_size();
    let too_large = || {
        Err(EvalAltResult::ErrorDataTooLarge("Length of string".into(), ctx.call_position()).into())
    };
    if max > 0 && len > max {
        return too_large();
    }
    let mut chars = string.chars().count();
    if chars >= len {
        return Ok(());
    }
    let padding_chars = padding.chars().count();
    let text = string.make_mut();
    while chars < len {
        if chars + padding_chars <= len {
            text.push_str(padding);
            chars += padding_chars;
        } else {
            text.extend(padding.chars().take(len - chars));
            chars = len;
        }
    }
    if max > 0 && text.len() > max {
        return too_large();
    }
    Ok(())
}

/// Functions registered under the name of one of Rhai's own, keeping its meaning: the faster
/// `contains` behind `in`, and a `pad` that returns. Not helpers for authors to learn (the
/// prompt's test lists every other registered name).
#[cfg(test)]
pub(crate) const REPLACEMENTS: &[&str] = &["contains", "pad"];

pub(super) fn register(engine: &mut Engine) {
    engine.register_fn("contains", string_in);
    engine.register_fn("pad", pad_string);
    engine
        .register_fn("hour_in", hour_in)
        .register_fn("minute_in", minute_in)
        .register_fn("weekday_in", weekday_in)
        .register_fn("is_weekend_in", is_weekend_in)
        .register_fn("date_in", date_in)
        .register_fn("within_hours", within_hours)
        .register_fn("ts", ts)
        .register_fn("hours_between", hours_between)
        .register_fn("days_between", days_between)
        .register_fn("email_domain", email_domain)
        .register_fn("is_blank", is_blank)
        .register_fn("any_in", any_in)
        .register_fn("all_in", all_in)
        .register_fn("none_in", none_in)
        .register_fn("percent_of", percent_of)
        .register_fn("percent_of", |p: INT, w: INT| {
            percent_of(p as f64, w as f64)
        })
        .register_fn("percent_of", |p: f64, w: INT| percent_of(p, w as f64))
        .register_fn("percent_of", |p: INT, w: f64| percent_of(p as f64, w));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An element of a list a predicate might search: every kind of value a context, a config
    /// or a literal can hold, strings from a small alphabet so that matches happen.
    fn element() -> impl Strategy<Value = Dynamic> {
        let leaf = prop_oneof![
            "[ab]{0,2}".prop_map(Dynamic::from),
            prop::char::range('a', 'b').prop_map(Dynamic::from),
            (-2i64..3).prop_map(Dynamic::from),
            (-2i64..3).prop_map(|n| Dynamic::from(n as f64)),
            any::<bool>().prop_map(Dynamic::from),
            Just(Dynamic::UNIT),
        ];
        leaf.prop_recursive(2, 8, 4, |inner| {
            prop::collection::vec(inner, 0..4).prop_map(Dynamic::from_array)
        })
    }

    proptest! {
        /// The engine's own `in` and `string_in` agree on every list and string: same
        /// answer, or both an error.
        #[test]
        fn string_in_means_what_the_engines_in_means(
            list in prop::collection::vec(element(), 0..40),
            value in "[ab]{0,2}",
        ) {
            let stock = Engine::new();
            let mut ours = Engine::new();
            register(&mut ours);
            let run = |engine: &Engine| {
                let mut scope = rhai::Scope::new();
                scope.push("list", list.clone());
                scope.push("value", value.clone());
                engine
                    .eval_with_scope::<bool>(&mut scope, "value in list")
                    .map_err(|e| e.to_string())
            };
            prop_assert_eq!(run(&stock), run(&ours));
        }
    }

    proptest! {
        /// With a padding, the sandbox's `pad` gives what Rhai's gives: the same string, or
        /// both refuse the length.
        #[test]
        fn pad_means_what_the_engines_pad_means(
            start in "[ab]{0,4}",
            len in -2i64..40,
            padding in "[xyé]{1,3}",
        ) {
            let mut stock = Engine::new();
            stock.set_max_string_size(24);
            let mut ours = Engine::new();
            ours.set_max_string_size(24);
            register(&mut ours);
            let run = |engine: &Engine| {
                let mut scope = rhai::Scope::new();
                scope.push("s", ImmutableString::from(start.as_str()));
                scope.push("n", len);
                scope.push("p", ImmutableString::from(padding.as_str()));
                engine
                    .eval_with_scope::<ImmutableString>(&mut scope, "s.pad(n, p); s")
                    .map(|s| s.to_string())
                    .map_err(|e| e.to_string())
            };
            prop_assert_eq!(run(&stock), run(&ours));
        }
    }

    #[test]
    fn pad_with_an_empty_padding_leaves_the_string() {
        let mut engine = Engine::new();
        register(&mut engine);
        let padded = engine.eval::<ImmutableString>(r#"let s = "ab"; s.pad(9999, ""); s"#);
        assert_eq!(padded.map(|s| s.to_string()).ok().as_deref(), Some("ab"));
    }

    #[test]
    fn hour_in_converts_to_the_named_zone() {
        // 2026-03-02T15:30:00Z is 10:30 in New York (EST) and 16:30 in Berlin (CET).
        let t = 1_772_465_400;
        assert_eq!(hour_in(t, "America/New_York").ok(), Some(10));
        assert_eq!(hour_in(t, "Europe/Berlin").ok(), Some(16));
        assert_eq!(weekday_in(t, "UTC").ok(), Some(1));
    }

    #[test]
    fn unknown_zone_is_an_error_not_a_panic() {
        let err = hour_in(0, "Mars/Olympus").err().map(|e| e.to_string());
        assert!(err
            .unwrap_or_default()
            .contains("unknown time zone 'Mars/Olympus'"));
    }

    #[test]
    fn out_of_range_timestamp_is_an_error() {
        assert!(hour_in(INT::MAX, "UTC").is_err());
        assert!(days_between(INT::MIN, INT::MAX).is_err());
    }

    #[test]
    fn night_window_wraps_midnight() {
        let at = |h: i64| h * 3600;
        assert_eq!(within_hours(at(23), "UTC", 22, 6).ok(), Some(true));
        assert_eq!(within_hours(at(3), "UTC", 22, 6).ok(), Some(true));
        assert_eq!(within_hours(at(12), "UTC", 22, 6).ok(), Some(false));
        assert_eq!(within_hours(at(9), "UTC", 9, 17).ok(), Some(true));
        assert_eq!(within_hours(at(17), "UTC", 9, 17).ok(), Some(false));
        assert!(within_hours(0, "UTC", -1, 30).is_err());
    }

    #[test]
    fn list_helpers_compare_by_value() {
        let a: Array = vec!["x".into(), Dynamic::from_int(2)];
        let b: Array = vec![Dynamic::from_int(2), "y".into()];
        assert_eq!(any_in(a.clone(), b.clone()).ok(), Some(true));
        assert_eq!(all_in(a.clone(), b.clone()).ok(), Some(false));
        assert_eq!(all_in(Array::new(), b.clone()).ok(), Some(true));
        assert_eq!(none_in(vec!["z".into()], b).ok(), Some(true));
    }

    #[test]
    fn list_helpers_bound_their_work() {
        let big: Array = (0..300).map(Dynamic::from_int).collect();
        let err = any_in(big.clone(), big.clone())
            .err()
            .map(|e| e.to_string());
        assert!(err.unwrap_or_default().contains("300×300 comparisons"));
        let fits: Array = (0..256).map(Dynamic::from_int).collect();
        assert_eq!(any_in(fits.clone(), fits).ok(), Some(true));
    }

    #[test]
    fn string_helpers_are_total() {
        assert_eq!(
            email_domain("Ann@Example.COM").ok().map(|s| s.to_string()),
            Some("example.com".to_string())
        );
        assert!(email_domain("nobody").is_err());
        assert!(email_domain("trailing@").is_err());
        assert!(is_blank("  \t"));
        assert!(ts("not a time").is_err());
        assert_eq!(ts("1970-01-01T01:00:00+01:00").ok(), Some(0));
        assert!(percent_of(1.0, 0.0).is_err());
    }
}
