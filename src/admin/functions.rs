//! The PostgreSQL functions the console's SQL offers, as SQLite functions
//! over the representation `admin::sql` gives PostgreSQL's types: a
//! timestamptz is UTC text of a fixed width (so that text order is time
//! order), an interval is a number of seconds. now(), date_trunc, extract,
//! to_timestamp, interval arithmetic, version() and current_setting() are
//! what Grafana's PostgreSQL data source and the usual health checks send.

use std::time::SystemTime;

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Timelike, Utc};
use rusqlite::functions::{Context, FunctionFlags};
use rusqlite::types::{Value, ValueRef};
use rusqlite::Connection;

use crate::admin::settings;

/// The fixed-width text form of a timestamptz inside SQLite.
const TIMESTAMP_FORMAT: &str = "%Y-%m-%d %H:%M:%S%.6f+00";

/// A timestamp in the text form SQLite holds.
pub fn timestamp_text(time: DateTime<Utc>) -> String {
    time.format(TIMESTAMP_FORMAT).to_string()
}

/// A timestamp as PostgreSQL prints a timestamptz in UTC: microseconds
/// without trailing zeros, none at all on a whole second.
pub fn postgres_text(time: DateTime<Utc>) -> String {
    let micros = time.timestamp_subsec_micros();
    let fraction = if micros == 0 {
        String::new()
    } else {
        format!(".{micros:06}").trim_end_matches('0').to_string()
    };
    format!("{}{fraction}+00", time.format("%Y-%m-%d %H:%M:%S"))
}

/// A `SystemTime` in the text form SQLite holds.
pub fn system_time_text(time: SystemTime) -> String {
    timestamp_text(DateTime::<Utc>::from(time))
}

/// Parses a timestamp as PostgreSQL accepts it for timestamptz: ISO 8601
/// with `T` or a space, an optional fraction, an offset as `Z`, `+HH`,
/// `+HHMM` or `+HH:MM` (UTC when absent), or a bare date.
pub fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Some(Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0)?));
    }
    let mut normal = text.replacen(' ', "T", 1);
    if normal.ends_with('Z') || normal.ends_with('z') {
        normal.pop();
        normal.push_str("+00:00");
    }
    // The offset starts at the last sign after the time of day.
    let offset_at = normal
        .get(11..)
        .and_then(|time| time.rfind(['+', '-']))
        .map(|at| at + 11);
    match offset_at {
        None => normal.push_str("+00:00"),
        Some(at) => {
            let digits: String = normal
                .get(at + 1..)?
                .chars()
                .filter(char::is_ascii_digit)
                .collect();
            let (hours, minutes) = match digits.len() {
                2 => (digits.as_str(), "00"),
                4 => (digits.get(..2)?, digits.get(2..)?),
                _ => return None,
            };
            normal = format!(
                "{}{}{hours}:{minutes}",
                normal.get(..at)?,
                normal.get(at..=at)?
            );
        }
    }
    DateTime::parse_from_rfc3339(&normal)
        .ok()
        .map(|time| time.with_timezone(&Utc))
}

/// Seconds in an interval written as PostgreSQL or Grafana write them:
/// `1 hour`, `2 days 3 hours`, `5 minutes`, `00:05:00`, `1h`, `30s`.
pub fn parse_interval(text: &str) -> Option<f64> {
    let text = text.trim().to_ascii_lowercase();
    if text.contains(':') {
        let mut seconds = 0.0;
        for part in text.split(':') {
            seconds = seconds * 60.0 + part.trim().parse::<f64>().ok()?;
        }
        return Some(seconds);
    }
    // Split "5minutes" and "1h" as "5 minutes" and "1 h".
    let mut spaced = String::new();
    let mut previous_digit = false;
    for ch in text.chars() {
        let digit = ch.is_ascii_digit() || ch == '.' || ch == '-';
        if previous_digit && ch.is_ascii_alphabetic() {
            spaced.push(' ');
        }
        previous_digit = digit;
        spaced.push(ch);
    }
    let words: Vec<&str> = spaced.split_whitespace().collect();
    if words.is_empty() || !words.len().is_multiple_of(2) {
        return None;
    }
    let mut seconds = 0.0;
    for pair in words.chunks(2) {
        let [amount, unit] = pair else { return None };
        let amount: f64 = amount.parse().ok()?;
        let unit_seconds = match unit.trim_end_matches('s') {
            "u" | "us" | "microsecond" => 1e-6,
            "m" if unit == &"ms" => 1e-3,
            "millisecond" => 1e-3,
            "" | "sec" | "second" => 1.0,
            "m" | "min" | "minute" => 60.0,
            "h" | "hr" | "hour" => 3_600.0,
            "d" | "day" => 86_400.0,
            "w" | "week" => 604_800.0,
            "mon" | "month" => 2_592_000.0,
            "y" | "year" => 31_557_600.0,
            _ => return None,
        };
        seconds += amount * unit_seconds;
    }
    Some(seconds)
}

fn user_error(message: String) -> rusqlite::Error {
    rusqlite::Error::UserFunctionError(message.into())
}

/// The timestamp in argument `index`: text in any form [`parse_timestamp`]
/// accepts; NULL stays NULL.
fn timestamp_arg(ctx: &Context<'_>, index: usize) -> rusqlite::Result<Option<DateTime<Utc>>> {
    match ctx.get_raw(index) {
        ValueRef::Null => Ok(None),
        ValueRef::Text(bytes) => {
            let text = String::from_utf8_lossy(bytes);
            parse_timestamp(&text).map(Some).ok_or_else(|| {
                user_error(format!(
                    "invalid input syntax for type timestamp with time zone: \"{text}\""
                ))
            })
        }
        _ => Err(user_error(
            "expected a timestamp (text such as '2026-01-31 12:00:00+00')".into(),
        )),
    }
}

fn text_arg(ctx: &Context<'_>, index: usize) -> rusqlite::Result<String> {
    match ctx.get_raw(index) {
        ValueRef::Text(bytes) => Ok(String::from_utf8_lossy(bytes).into_owned()),
        ValueRef::Integer(value) => Ok(value.to_string()),
        ValueRef::Real(value) => Ok(value.to_string()),
        _ => Err(user_error("expected text".into())),
    }
}

fn number_arg(ctx: &Context<'_>, index: usize) -> rusqlite::Result<Option<f64>> {
    match ctx.get_raw(index) {
        ValueRef::Null => Ok(None),
        ValueRef::Integer(value) => Ok(Some(value as f64)),
        ValueRef::Real(value) => Ok(Some(value)),
        ValueRef::Text(bytes) => String::from_utf8_lossy(bytes)
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| user_error("expected a number".into())),
        ValueRef::Blob(_) => Err(user_error("expected a number".into())),
    }
}

/// A cast to an integer type: numbers round as PostgreSQL rounds them,
/// text must be a whole number.
fn integer_cast(ctx: &Context<'_>, type_name: &str) -> rusqlite::Result<Value> {
    match ctx.get_raw(0) {
        ValueRef::Null => Ok(Value::Null),
        ValueRef::Integer(value) => Ok(Value::Integer(value)),
        ValueRef::Real(value) => Ok(Value::Integer(value.round() as i64)),
        ValueRef::Text(bytes) => {
            let text = String::from_utf8_lossy(bytes);
            text.trim().parse().map(Value::Integer).map_err(|_| {
                user_error(format!(
                    "invalid input syntax for type {type_name}: \"{text}\""
                ))
            })
        }
        ValueRef::Blob(_) => Err(user_error(format!("cannot cast to {type_name}"))),
    }
}

fn from_epoch(seconds: f64) -> Option<DateTime<Utc>> {
    let micros = (seconds * 1e6).round();
    if !micros.is_finite() || micros.abs() > 9.0e18 {
        return None;
    }
    DateTime::from_timestamp_micros(micros as i64)
}

fn epoch_of(time: DateTime<Utc>) -> f64 {
    time.timestamp_micros() as f64 / 1e6
}

/// date_trunc(unit, ts).
pub fn date_trunc(unit: &str, time: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let date = time.date_naive();
    let day_start = |date: NaiveDate| Some(Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0)?));
    match unit.to_ascii_lowercase().as_str() {
        "microseconds" => Some(time),
        "milliseconds" => time.with_nanosecond(time.nanosecond() / 1_000_000 * 1_000_000),
        "second" => time.with_nanosecond(0),
        "minute" => time.with_nanosecond(0)?.with_second(0),
        "hour" => time.with_nanosecond(0)?.with_second(0)?.with_minute(0),
        "day" => day_start(date),
        "week" => {
            day_start(date - chrono::Days::new(u64::from(date.weekday().num_days_from_monday())))
        }
        "month" => day_start(date.with_day(1)?),
        "quarter" => day_start(NaiveDate::from_ymd_opt(
            date.year(),
            (date.month0() / 3) * 3 + 1,
            1,
        )?),
        "year" => day_start(NaiveDate::from_ymd_opt(date.year(), 1, 1)?),
        _ => None,
    }
}

/// extract(field FROM ts).
pub fn extract(field: &str, time: DateTime<Utc>) -> Option<f64> {
    let seconds = f64::from(time.second()) + f64::from(time.nanosecond()) / 1e9;
    Some(match field.to_ascii_lowercase().as_str() {
        "epoch" => epoch_of(time),
        "year" => f64::from(time.year()),
        "quarter" => f64::from(time.month0() / 3 + 1),
        "month" => f64::from(time.month()),
        "week" => f64::from(time.iso_week().week()),
        "day" => f64::from(time.day()),
        "doy" => f64::from(time.ordinal()),
        "dow" => f64::from(time.weekday().num_days_from_sunday()),
        "isodow" => f64::from(time.weekday().number_from_monday()),
        "hour" => f64::from(time.hour()),
        "minute" => f64::from(time.minute()),
        "second" => seconds,
        "milliseconds" => seconds * 1e3,
        "microseconds" => seconds * 1e6,
        _ => return None,
    })
}

fn text_value(time: Option<DateTime<Utc>>) -> Value {
    time.map_or(Value::Null, |time| Value::Text(timestamp_text(time)))
}

/// Registers every function on `connection`; `now` is the time of the
/// statement, as PostgreSQL's now() is fixed within a transaction.
pub fn register(connection: &Connection, now: SystemTime, user: &str) -> rusqlite::Result<()> {
    let flags = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC;
    let now_text = system_time_text(now);
    for name in [
        "now",
        "pg_now",
        "transaction_timestamp",
        "statement_timestamp",
        "clock_timestamp",
    ] {
        let now_text = now_text.clone();
        connection.create_scalar_function(name, 0, flags, move |_| Ok(now_text.clone()))?;
    }
    connection.create_scalar_function("pg_timestamptz", 1, flags, |ctx| {
        Ok(text_value(timestamp_arg(ctx, 0)?))
    })?;
    connection.create_scalar_function("to_timestamp", 1, flags, |ctx| {
        Ok(text_value(number_arg(ctx, 0)?.and_then(from_epoch)))
    })?;
    connection.create_scalar_function("date_trunc", 2, flags, |ctx| {
        let unit = text_arg(ctx, 0)?;
        let Some(time) = timestamp_arg(ctx, 1)? else {
            return Ok(Value::Null);
        };
        date_trunc(&unit, time)
            .map(|time| Value::Text(timestamp_text(time)))
            .ok_or_else(|| user_error(format!("unit \"{unit}\" not recognized for date_trunc")))
    })?;
    connection.create_scalar_function("pg_extract", 2, flags, |ctx| {
        let field = text_arg(ctx, 0)?;
        // An interval is seconds: its epoch is itself.
        if let ValueRef::Integer(_) | ValueRef::Real(_) = ctx.get_raw(1) {
            return match field.to_ascii_lowercase().as_str() {
                "epoch" => Ok(number_arg(ctx, 1)?.map_or(Value::Null, Value::Real)),
                _ => Err(user_error(format!(
                    "extract({field} from interval) is not supported; use epoch"
                ))),
            };
        }
        let Some(time) = timestamp_arg(ctx, 1)? else {
            return Ok(Value::Null);
        };
        extract(&field, time)
            .map(Value::Real)
            .ok_or_else(|| user_error(format!("unit \"{field}\" not recognized for extract")))
    })?;
    connection.create_scalar_function("pg_interval", 1, flags, |ctx| {
        let text = text_arg(ctx, 0)?;
        parse_interval(&text).map(Value::Real).ok_or_else(|| {
            user_error(format!(
                "invalid input syntax for type interval: \"{text}\""
            ))
        })
    })?;
    connection.create_scalar_function("pg_ts_add", 2, flags, |ctx| {
        let (Some(time), Some(seconds)) = (timestamp_arg(ctx, 0)?, number_arg(ctx, 1)?) else {
            return Ok(Value::Null);
        };
        Ok(text_value(from_epoch(epoch_of(time) + seconds)))
    })?;
    connection.create_scalar_function("pg_ts_diff", 2, flags, |ctx| {
        let (Some(later), Some(earlier)) = (timestamp_arg(ctx, 0)?, timestamp_arg(ctx, 1)?) else {
            return Ok(Value::Null);
        };
        Ok(Value::Real(epoch_of(later) - epoch_of(earlier)))
    })?;
    connection.create_scalar_function("pg_bool", 1, flags, |ctx| {
        Ok(match ctx.get_raw(0) {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(value) => Value::Integer(i64::from(value != 0)),
            ValueRef::Text(bytes) => {
                match String::from_utf8_lossy(bytes)
                    .trim()
                    .to_ascii_lowercase()
                    .as_str()
                {
                    "t" | "true" | "y" | "yes" | "on" | "1" => Value::Integer(1),
                    "f" | "false" | "n" | "no" | "off" | "0" => Value::Integer(0),
                    other => {
                        return Err(user_error(format!(
                            "invalid input syntax for type boolean: \"{other}\""
                        )))
                    }
                }
            }
            _ => return Err(user_error("cannot cast to boolean".into())),
        })
    })?;
    connection.create_scalar_function("pg_int4", 1, flags, |ctx| integer_cast(ctx, "integer"))?;
    connection.create_scalar_function("pg_int8", 1, flags, |ctx| integer_cast(ctx, "bigint"))?;
    connection.create_scalar_function("pg_float8", 1, flags, |ctx| {
        Ok(number_arg(ctx, 0)?.map_or(Value::Null, Value::Real))
    })?;
    connection.create_scalar_function("pg_text", 1, flags, |ctx| {
        Ok(match ctx.get_raw(0) {
            ValueRef::Null => Value::Null,
            _ => Value::Text(text_arg(ctx, 0)?),
        })
    })?;
    for (name, round) in [
        ("floor", f64::floor as fn(f64) -> f64),
        ("ceil", f64::ceil),
        ("ceiling", f64::ceil),
    ] {
        connection.create_scalar_function(name, 1, flags, move |ctx| {
            Ok(number_arg(ctx, 0)?.map_or(Value::Null, |value| Value::Real(round(value))))
        })?;
    }
    connection.create_scalar_function("version", 0, flags, |_| Ok(settings::version()))?;
    connection.create_scalar_function("current_database", 0, flags, |_| {
        Ok(settings::DATABASE.to_string())
    })?;
    let user = user.to_string();
    connection.create_scalar_function("pg_current_user", 0, flags, move |_| Ok(user.clone()))?;
    connection.create_scalar_function("current_setting", 1, flags, |ctx| {
        let name = text_arg(ctx, 0)?;
        settings::value(&name)
            .ok_or_else(|| user_error(format!("unrecognized configuration parameter \"{name}\"")))
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        parse_timestamp(text).unwrap_or_else(|| panic!("{text} parses"))
    }

    #[test]
    fn timestamps_parse_in_the_forms_clients_send() {
        let expected = "2026-11-26 16:00:00.000000+00";
        for text in [
            "2026-11-26T16:00:00Z",
            "2026-11-26 16:00:00+00",
            "2026-11-26 17:00:00+01",
            "2026-11-26 11:00:00-05:00",
            "2026-11-26T16:00:00.000Z",
            "2026-11-26 16:00:00",
            "2026-11-26 18:30:00+0230",
        ] {
            assert_eq!(timestamp_text(at(text)), expected, "{text}");
        }
        assert_eq!(
            timestamp_text(at("2026-11-26")),
            "2026-11-26 00:00:00.000000+00"
        );
        assert_eq!(
            timestamp_text(at("2026-11-26 16:00:00.25+00")),
            "2026-11-26 16:00:00.250000+00"
        );
        assert_eq!(
            postgres_text(at("2026-11-26 16:00:00.25+00")),
            "2026-11-26 16:00:00.25+00"
        );
        assert_eq!(
            postgres_text(at("2026-11-26 16:00:00+00")),
            "2026-11-26 16:00:00+00"
        );
        assert!(parse_timestamp("yesterday-ish").is_none());
        assert!(parse_timestamp("2026-11-26 16:00:00+1").is_none());
        // Text order is time order.
        assert!(
            timestamp_text(at("2026-11-26 09:00:00Z")) < timestamp_text(at("2026-11-26 10:00:00Z"))
        );
    }

    #[test]
    fn intervals_parse_as_seconds() {
        for (text, seconds) in [
            ("1 hour", 3_600.0),
            ("2 days 3 hours", 183_600.0),
            ("5 minutes", 300.0),
            ("00:05:00", 300.0),
            ("1h", 3_600.0),
            ("30s", 30.0),
            ("1m", 60.0),
            ("250ms", 0.25),
            ("7 DAYS", 604_800.0),
        ] {
            assert_eq!(parse_interval(text), Some(seconds), "{text}");
        }
        assert_eq!(parse_interval("soon"), None);
        assert_eq!(parse_interval("5"), None);
    }

    #[test]
    fn date_trunc_and_extract_match_postgresql() {
        let time = at("2026-11-26 16:47:31.5+00");
        let trunc = |unit| timestamp_text(date_trunc(unit, time).unwrap());
        assert_eq!(trunc("minute"), "2026-11-26 16:47:00.000000+00");
        assert_eq!(trunc("hour"), "2026-11-26 16:00:00.000000+00");
        assert_eq!(trunc("day"), "2026-11-26 00:00:00.000000+00");
        assert_eq!(trunc("week"), "2026-11-23 00:00:00.000000+00");
        assert_eq!(trunc("quarter"), "2026-10-01 00:00:00.000000+00");
        assert!(date_trunc("fortnight", time).is_none());
        assert_eq!(extract("epoch", time), Some(1_795_711_651.5));
        assert_eq!(extract("hour", time), Some(16.0));
        assert_eq!(extract("dow", time), Some(4.0));
        assert_eq!(extract("second", time), Some(31.5));
    }
}
