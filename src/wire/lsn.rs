//! The WAL position (log sequence number) in PostgreSQL's own `X/X` text form,
//! so that positions read in logs, status output and `pg_lsn` columns look the
//! same.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A byte position in the WAL stream.
///
/// Printed and parsed as PostgreSQL prints `pg_lsn`: the high and low 32 bits
/// in uppercase hexadecimal without zero padding, separated by `/`
/// (e.g. `16/B374D848`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// PostgreSQL's `InvalidXLogRecPtr`: no position known.
    pub const INVALID: Lsn = Lsn(0);

    /// How many WAL bytes lie between `earlier` and `self`; zero if `earlier`
    /// is actually later (positions observed out of order must not wrap).
    pub fn bytes_since(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// Why a string is not an LSN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LsnParseError {
    #[error(
        "invalid LSN {0:?}: expected two hexadecimal numbers separated by '/', e.g. 16/B374D848"
    )]
    Malformed(String),
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let malformed = || LsnParseError::Malformed(text.to_owned());
        let (high_text, low_text) = text.split_once('/').ok_or_else(malformed)?;
        let parse_half = |half: &str| {
            // from_str_radix accepts a leading '+', which pg_lsn does not.
            if half.is_empty() || half.len() > 8 || !half.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(malformed());
            }
            u32::from_str_radix(half, 16).map_err(|_| malformed())
        };
        let high = parse_half(high_text)?;
        let low = parse_half(low_text)?;
        Ok(Lsn((u64::from(high) << 32) | u64::from(low)))
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_like_postgres() {
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(format!("{:?}", Lsn(0x1_0000_0000)), "1/0");
        assert_eq!(Lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
    }

    #[test]
    fn parses_what_it_prints_and_lowercase() {
        for value in [0, 1, 0x16_B374_D848, u64::MAX, 0xFFFF_FFFF] {
            let lsn = Lsn(value);
            assert_eq!(lsn.to_string().parse::<Lsn>(), Ok(lsn));
        }
        assert_eq!("16/b374d848".parse::<Lsn>(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!("00000016/0000000A".parse::<Lsn>(), Ok(Lsn(0x16_0000_000A)));
    }

    #[test]
    fn rejects_malformed_text() {
        for text in [
            "",
            "/",
            "0/",
            "/0",
            "0",
            "0/0/0",
            "G/0",
            "+1/0",
            "1/-0",
            "100000000/0",
            " 0/0",
        ] {
            let error = text.parse::<Lsn>().unwrap_err();
            assert!(error.to_string().contains("invalid LSN"), "{text:?}");
        }
    }

    #[test]
    fn bytes_since_saturates() {
        assert_eq!(Lsn(100).bytes_since(Lsn(40)), 60);
        assert_eq!(Lsn(40).bytes_since(Lsn(100)), 0);
        assert_eq!(Lsn::INVALID, Lsn::default());
    }

    #[test]
    fn serde_uses_the_text_form() {
        let json = serde_json::to_string(&Lsn(0x16_B374_D848)).unwrap();
        assert_eq!(json, "\"16/B374D848\"");
        assert_eq!(
            serde_json::from_str::<Lsn>(&json).unwrap(),
            Lsn(0x16_B374_D848)
        );
        assert!(serde_json::from_str::<Lsn>("\"nope\"").is_err());
        assert!(serde_json::from_str::<Lsn>("17").is_err());
    }
}
