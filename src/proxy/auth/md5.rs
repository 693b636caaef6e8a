//! PostgreSQL's md5 password method from a stored verifier (`md5` followed
//! by hex(md5(password || user)), as in `pg_authid.rolpassword`): the
//! answer a client must give to a salt, which the proxy both checks
//! (client side) and sends (server side). Pure; nothing here is async.

use md5::{Digest, Md5};
use subtle::ConstantTimeEq;

/// An md5 verifier: the 32 hex digits after the `md5` prefix.
#[derive(Clone, PartialEq, Eq)]
pub struct Md5Verifier(String);

impl std::fmt::Debug for Md5Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Md5Verifier(<redacted>)")
    }
}

impl std::str::FromStr for Md5Verifier {
    type Err = &'static str;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.strip_prefix("md5")
            .filter(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(|hex| Md5Verifier(hex.to_ascii_lowercase()))
            .ok_or("not an md5 verifier (md5 followed by 32 hex digits)")
    }
}

impl Md5Verifier {
    /// The PasswordMessage text that answers `salt`:
    /// `md5` hex(md5(verifier hex || salt)).
    pub fn answer(&self, salt: [u8; 4]) -> String {
        let mut hasher = Md5::new();
        hasher.update(self.0.as_bytes());
        hasher.update(salt);
        let mut answer = String::with_capacity(35);
        answer.push_str("md5");
        answer.push_str(&hex::encode(hasher.finalize()));
        answer
    }

    /// Whether a client's answer to `salt` is right, in constant time.
    pub fn check(&self, salt: [u8; 4], answer: &str) -> bool {
        self.answer(salt).as_bytes().ct_eq(answer.as_bytes()).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_as_libpq_does() {
        // md5("wonder" || "alice"), as PostgreSQL stores it.
        let stored: String = Md5::digest(b"wonderalice")
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        let verifier: Md5Verifier = format!("md5{stored}").parse().unwrap();
        let salt = [1, 2, 3, 4];
        // libpq's pg_md5_encrypt(pg_md5_encrypt(password, user), salt).
        let mut outer = Md5::new();
        outer.update(stored.as_bytes());
        outer.update(salt);
        let expected: String = outer
            .finalize()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        assert_eq!(verifier.answer(salt), format!("md5{expected}"));
        assert!(verifier.check(salt, &format!("md5{expected}")));
        assert!(!verifier.check([4, 3, 2, 1], &format!("md5{expected}")));
        assert!("md5xyz".parse::<Md5Verifier>().is_err());
        assert!("SCRAM-SHA-256$4096:...".parse::<Md5Verifier>().is_err());
    }
}
