//! SCRAM-SHA-256 (RFC 5802, RFC 7677) both ways, as pure state machines:
//! [`ScramServer`] verifies a client's proof against a stored verifier and
//! recovers the client's ClientKey from it (ClientKey = ClientProof XOR
//! HMAC(StoredKey, AuthMessage), checked by H(ClientKey) = StoredKey), and
//! [`ScramClient`] logs in to a PostgreSQL server with that ClientKey, as
//! PgBouncer does, so that no plaintext password is needed anywhere.
//!
//! Channel binding is `tls-server-end-point` (RFC 5929) to the proxy's own
//! certificate; the caller supplies its hash. The byte-level IO (messages,
//! sockets) is `exchange`'s; nothing here is async.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use ring::{digest, hmac};
use subtle::ConstantTimeEq;

pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// The only channel binding type PostgreSQL implements.
const TLS_SERVER_END_POINT: &str = "tls-server-end-point";
/// Raw nonce bytes, as PostgreSQL's `SCRAM_RAW_NONCE_LEN`.
const RAW_NONCE_LEN: usize = 18;
/// SHA-256 output: StoredKey, ServerKey, ClientKey, proofs.
pub const KEY_LEN: usize = 32;
/// Iterations of a decoy verifier: PostgreSQL's default
/// `scram_iterations`, so that a decoy looks like a real one.
pub const DECOY_ITERATIONS: u32 = 4096;
/// Salt length of a decoy verifier: PostgreSQL's `SCRAM_DEFAULT_SALT_LEN`.
pub const DECOY_SALT_LEN: usize = 16;

/// Why a SCRAM exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// The proof does not match: wrong password, or an unknown user's decoy.
    #[error("the client's proof does not match the verifier")]
    WrongProof,
    /// The client broke the protocol; worded as PostgreSQL words it.
    #[error("{0}")]
    Protocol(String),
    /// The server's message did not parse or its signature is wrong.
    #[error("server's SCRAM message: {0}")]
    Server(String),
}

fn protocol(message: impl Into<String>) -> ScramError {
    ScramError::Protocol(message.into())
}

/// A stored SCRAM-SHA-256 verifier, as in `pg_authid.rolpassword`:
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; KEY_LEN],
    pub server_key: [u8; KEY_LEN],
}

/// Keys stay out of logs.
impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .field("keys", &"<redacted>")
            .finish()
    }
}

impl FromStr for ScramVerifier {
    type Err = &'static str;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = "not a SCRAM-SHA-256 verifier (SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>)";
        let rest = text.strip_prefix("SCRAM-SHA-256$").ok_or(bad)?;
        let (params, keys) = rest.split_once('$').ok_or(bad)?;
        let (iterations, salt) = params.split_once(':').ok_or(bad)?;
        let (stored_key, server_key) = keys.split_once(':').ok_or(bad)?;
        let key = |b64: &str| -> Result<[u8; KEY_LEN], &'static str> {
            BASE64
                .decode(b64)
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .ok_or(bad)
        };
        Ok(ScramVerifier {
            iterations: iterations.parse().ok().filter(|n| *n > 0).ok_or(bad)?,
            salt: BASE64.decode(salt).map_err(|_| bad)?,
            stored_key: key(stored_key)?,
            server_key: key(server_key)?,
        })
    }
}

impl ScramVerifier {
    /// The verifier of `password`, as PostgreSQL's `scram_build_secret`
    /// makes it (the demo writes its userlist with one).
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> ScramVerifier {
        let mut salted = [0; KEY_LEN];
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            std::num::NonZeroU32::new(iterations.max(1)).unwrap_or(std::num::NonZeroU32::MIN),
            salt,
            password.as_bytes(),
            &mut salted,
        );
        ScramVerifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&hmac_sha256(&salted, b"Client Key")),
            server_key: hmac_sha256(&salted, b"Server Key"),
        }
    }

    /// As `pg_authid.rolpassword` and a userlist hold it.
    pub fn to_text(&self) -> String {
        format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            BASE64.encode(&self.salt),
            BASE64.encode(self.stored_key),
            BASE64.encode(self.server_key)
        )
    }

    /// A verifier no proof matches, for users that do not exist: its salt
    /// is derived from the user name with the proxy's secret `mock_key`,
    /// so the same user always gets the same salt (as PostgreSQL's
    /// `scram_mock_salt`), and nothing tells it from a real one.
    pub fn decoy(user: &str, mock_key: &hmac::Key) -> ScramVerifier {
        let tag = hmac::sign(mock_key, user.as_bytes());
        let salt = tag.as_ref().get(..DECOY_SALT_LEN).unwrap_or_default();
        ScramVerifier {
            iterations: DECOY_ITERATIONS,
            salt: salt.to_vec(),
            // H(ClientKey) = [0; 32] has no known ClientKey.
            stored_key: [0; KEY_LEN],
            server_key: [0; KEY_LEN],
        }
    }
}

/// A ClientKey recovered from a client's proof: enough to log in to any
/// server holding the same verifier.
#[derive(Clone)]
pub struct ClientKey(pub [u8; KEY_LEN]);

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientKey(<redacted>)")
    }
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; KEY_LEN] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), message);
    let mut out = [0; KEY_LEN];
    out.copy_from_slice(tag.as_ref());
    out
}

fn sha256(bytes: &[u8]) -> [u8; KEY_LEN] {
    let mut out = [0; KEY_LEN];
    out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    out
}

fn xor(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    let mut out = [0; KEY_LEN];
    for (out, (a, b)) in out.iter_mut().zip(a.iter().zip(b)) {
        *out = a ^ b;
    }
    out
}

fn nonce() -> String {
    BASE64.encode(rand::random::<[u8; RAW_NONCE_LEN]>())
}

/// The value of attribute `name` (`r`, `s`, `i`, `c`, `p`, `v`, `e`) at
/// the head of `text`, and what follows its comma.
fn attribute(text: &str, name: char) -> Option<(&str, &str)> {
    let rest = text.strip_prefix(name)?.strip_prefix('=')?;
    Some(rest.split_once(',').unwrap_or((rest, "")))
}

/// A nonce is printable ASCII without ',' (RFC 5802 section 7).
fn valid_nonce(nonce: &str) -> bool {
    !nonce.is_empty()
        && nonce
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// What the proxy offers a client for channel binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// Not over TLS: plain SCRAM-SHA-256 only.
    Unavailable,
    /// Over TLS: SCRAM-SHA-256-PLUS bound to this hash of the proxy's
    /// certificate, besides SCRAM-SHA-256.
    EndPoint(Vec<u8>),
}

impl Binding {
    /// The mechanisms to offer, the preferred first (as PostgreSQL).
    pub fn mechanisms(&self) -> Vec<String> {
        match self {
            Binding::Unavailable => vec![SCRAM_SHA_256.into()],
            Binding::EndPoint(_) => vec![SCRAM_SHA_256_PLUS.into(), SCRAM_SHA_256.into()],
        }
    }
}

/// The proxy's side of one client's SCRAM exchange, between its
/// server-first and the client's final message.
pub struct ScramServer {
    verifier: ScramVerifier,
    /// The client's gs2 header and binding data, which `c=` must carry.
    channel_binding: Vec<u8>,
    /// client-first-message-bare "," server-first-message.
    auth_message_head: String,
    nonce: String,
}

impl ScramServer {
    /// Reads the client-first message for `mechanism` and returns the
    /// server-first message to send.
    pub fn start(
        verifier: ScramVerifier,
        mechanism: &str,
        client_first: &[u8],
        binding: &Binding,
    ) -> Result<(ScramServer, String), ScramError> {
        let plus = match mechanism {
            SCRAM_SHA_256 => false,
            SCRAM_SHA_256_PLUS if matches!(binding, Binding::EndPoint(_)) => true,
            _ => {
                return Err(protocol(
                    "client selected an invalid SASL authentication mechanism",
                ))
            }
        };
        let text = std::str::from_utf8(client_first)
            .map_err(|_| protocol("malformed SCRAM message (not UTF-8)"))?;
        // gs2-header: cbind-flag "," [authzid] ","
        let (flag, rest) = text
            .split_once(',')
            .ok_or_else(|| protocol("malformed SCRAM message (no gs2 header)"))?;
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or_else(|| protocol("malformed SCRAM message (no gs2 header)"))?;
        if !authzid.is_empty() {
            return Err(protocol(
                "client uses authorization identity, but it is not supported",
            ));
        }
        let header_len = flag.len() + authzid.len() + 2;
        let header = text.get(..header_len).unwrap_or_default().as_bytes();
        let mut channel_binding = header.to_vec();
        match (flag, binding) {
            ("n", _) if !plus => {}
            ("y", Binding::Unavailable) if !plus => {}
            ("y", Binding::EndPoint(_)) => {
                return Err(protocol(
                    "SCRAM channel binding negotiation error: the client supports SCRAM channel \
                     binding but thinks the server does not; however, this server does support \
                     channel binding",
                ))
            }
            (flag, Binding::EndPoint(hash)) if plus => {
                if flag.strip_prefix("p=") != Some(TLS_SERVER_END_POINT) {
                    return Err(protocol(format!(
                        "unsupported SCRAM channel-binding type \"{}\"",
                        flag.trim_start_matches("p=")
                    )));
                }
                channel_binding.extend_from_slice(hash);
            }
            _ if plus => {
                return Err(protocol(
                    "the client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not \
                     include channel binding data",
                ))
            }
            _ => {
                return Err(protocol(
                    "the client selected SCRAM-SHA-256 without channel binding, but the SCRAM \
                     message includes channel binding data",
                ))
            }
        }
        // client-first-message-bare: "n=" user "," "r=" nonce ["," ext]
        // (PostgreSQL ignores the user here: the startup packet names it).
        let (_, after_user) =
            attribute(bare, 'n').ok_or_else(|| protocol("malformed SCRAM message (no user)"))?;
        let (client_nonce, _) = attribute(after_user, 'r')
            .ok_or_else(|| protocol("malformed SCRAM message (no nonce)"))?;
        if !valid_nonce(client_nonce) {
            return Err(protocol("malformed SCRAM message (invalid nonce)"));
        }
        // concat rather than format!: this runs once per login.
        let nonce = [client_nonce, &nonce()].concat();
        let server_first = [
            "r=",
            &nonce,
            ",s=",
            &BASE64.encode(&verifier.salt),
            ",i=",
            &verifier.iterations.to_string(),
        ]
        .concat();
        let server = ScramServer {
            verifier,
            channel_binding,
            auth_message_head: [bare, ",", &server_first].concat(),
            nonce,
        };
        Ok((server, server_first))
    }

    /// Checks the client-final message; on success the recovered
    /// ClientKey and the server-final message to send.
    pub fn finish(self, client_final: &[u8]) -> Result<(ClientKey, String), ScramError> {
        let text = std::str::from_utf8(client_final)
            .map_err(|_| protocol("malformed SCRAM message (not UTF-8)"))?;
        let (binding, rest) = attribute(text, 'c')
            .ok_or_else(|| protocol("malformed SCRAM message (no channel binding)"))?;
        let (nonce, _) =
            attribute(rest, 'r').ok_or_else(|| protocol("malformed SCRAM message (no nonce)"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or_else(|| protocol("malformed SCRAM message (no proof)"))?;
        if BASE64.decode(binding).ok().as_deref() != Some(self.channel_binding.as_slice()) {
            return Err(protocol("SCRAM channel binding check failed"));
        }
        if nonce != self.nonce {
            return Err(protocol("unexpected SCRAM nonce"));
        }
        let proof: [u8; KEY_LEN] = BASE64
            .decode(proof)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| protocol("malformed SCRAM message (invalid proof)"))?;
        let auth_message = [&self.auth_message_head, ",", without_proof].concat();
        let client_signature = hmac_sha256(&self.verifier.stored_key, auth_message.as_bytes());
        let client_key = xor(&proof, &client_signature);
        if !bool::from(sha256(&client_key).ct_eq(&self.verifier.stored_key)) {
            return Err(ScramError::WrongProof);
        }
        let server_signature = hmac_sha256(&self.verifier.server_key, auth_message.as_bytes());
        let mut server_final = String::from("v=");
        BASE64.encode_string(server_signature, &mut server_final);
        Ok((ClientKey(client_key), server_final))
    }
}

/// The proxy's side of a SCRAM-SHA-256 login to a server with a recovered
/// ClientKey (no channel binding: gs2 header "n,,").
pub struct ScramClient {
    client_first_bare: String,
    client_nonce: String,
}

/// A client-final message sent; what the server-final must then prove.
pub struct ScramClientFinal {
    expected_signature: [u8; KEY_LEN],
}

/// What a server's first SCRAM message asked for, for a comparison with
/// the verifier the proxy holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerParams {
    pub salt: Vec<u8>,
    pub iterations: u32,
}

impl ScramClient {
    /// The client-first message, with an empty user name as libpq sends
    /// (the server takes the startup packet's).
    pub fn start() -> (ScramClient, String) {
        let client_nonce = nonce();
        let client_first_bare = format!("n=,r={client_nonce}");
        let first = format!("n,,{client_first_bare}");
        (
            ScramClient {
                client_first_bare,
                client_nonce,
            },
            first,
        )
    }

    /// Answers the server-first message with a proof from `client_key`;
    /// `server_key` checks the server's final signature. Also returns the
    /// server's salt and iterations (a proof from a verifier with other
    /// ones cannot succeed).
    pub fn answer(
        self,
        server_first: &[u8],
        client_key: &ClientKey,
        server_key: &[u8; KEY_LEN],
    ) -> Result<(ScramClientFinal, String, ServerParams), ScramError> {
        let bad =
            |what: &str| ScramError::Server(format!("malformed server-first message ({what})"));
        let text = std::str::from_utf8(server_first).map_err(|_| bad("not UTF-8"))?;
        let (nonce, rest) = attribute(text, 'r').ok_or_else(|| bad("no nonce"))?;
        if !nonce.starts_with(&self.client_nonce) || !valid_nonce(nonce) {
            return Err(bad("nonce does not extend ours"));
        }
        let (salt, rest) = attribute(rest, 's').ok_or_else(|| bad("no salt"))?;
        let (iterations, _) = attribute(rest, 'i').ok_or_else(|| bad("no iterations"))?;
        let params = ServerParams {
            salt: BASE64.decode(salt).map_err(|_| bad("salt"))?,
            iterations: iterations.parse().map_err(|_| bad("iterations"))?,
        };
        // "biws" is base64 of the gs2 header "n,,".
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare);
        let stored_key = sha256(&client_key.0);
        let proof = xor(
            &client_key.0,
            &hmac_sha256(&stored_key, auth_message.as_bytes()),
        );
        let expected_signature = hmac_sha256(server_key, auth_message.as_bytes());
        let client_final = format!("{without_proof},p={}", BASE64.encode(proof));
        Ok((
            ScramClientFinal { expected_signature },
            client_final,
            params,
        ))
    }
}

impl ScramClientFinal {
    /// Checks the server-final message: the server proves it holds the
    /// ServerKey.
    pub fn verify(self, server_final: &[u8]) -> Result<(), ScramError> {
        let text = std::str::from_utf8(server_final)
            .map_err(|_| ScramError::Server("server-final message is not UTF-8".into()))?;
        if let Some((error, _)) = attribute(text, 'e') {
            return Err(ScramError::Server(format!("server reported {error:?}")));
        }
        let (signature, _) = attribute(text, 'v')
            .ok_or_else(|| ScramError::Server("server-final message without v=".into()))?;
        let matches = BASE64
            .decode(signature)
            .is_ok_and(|got| bool::from(got.ct_eq(&self.expected_signature)));
        if matches {
            Ok(())
        } else {
            Err(ScramError::Server(
                "the server's signature does not match".into(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::pbkdf2;

    fn verifier_of(password: &str, salt: &[u8], iterations: u32) -> ScramVerifier {
        ScramVerifier::from_password(password, salt, iterations)
    }

    /// RFC 7677 section 3: user "user", password "pencil".
    const RFC_SALT: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";
    const RFC_CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const RFC_SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const RFC_CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                                    p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const RFC_SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_verifier() -> ScramVerifier {
        verifier_of("pencil", &BASE64.decode(RFC_SALT).unwrap(), 4096)
    }

    /// The server side of the RFC's exchange, with the RFC's server nonce.
    fn rfc_server() -> ScramServer {
        let (mut server, _) = ScramServer::start(
            rfc_verifier(),
            SCRAM_SHA_256,
            RFC_CLIENT_FIRST.as_bytes(),
            &Binding::Unavailable,
        )
        .unwrap();
        server.nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into();
        server.auth_message_head = format!("n=user,r=rOprNGfwEbeRWgbNEkqO,{RFC_SERVER_FIRST}");
        server
    }

    #[test]
    fn verifier_text_round_trips() {
        let verifier = rfc_verifier();
        assert_eq!(
            verifier.to_text().parse::<ScramVerifier>().unwrap(),
            verifier
        );
        assert!("md5abc".parse::<ScramVerifier>().is_err());
        assert!("SCRAM-SHA-256$0:AA==$AA==:AA=="
            .parse::<ScramVerifier>()
            .is_err());
        assert_eq!(
            format!("{verifier:?}"),
            r#"ScramVerifier { iterations: 4096, keys: "<redacted>" }"#
        );
    }

    #[test]
    fn rfc_7677_proof_verifies_and_yields_the_client_key() {
        let (client_key, server_final) = rfc_server().finish(RFC_CLIENT_FINAL.as_bytes()).unwrap();
        assert_eq!(server_final, RFC_SERVER_FINAL);
        // The recovered ClientKey is HMAC(SaltedPassword, "Client Key").
        let mut salted = [0; KEY_LEN];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            std::num::NonZeroU32::new(4096).unwrap(),
            &BASE64.decode(RFC_SALT).unwrap(),
            b"pencil",
            &mut salted,
        );
        assert_eq!(client_key.0, hmac_sha256(&salted, b"Client Key"));
    }

    #[test]
    fn a_wrong_proof_or_a_decoy_is_refused() {
        let wrong = verifier_of("crayon", &BASE64.decode(RFC_SALT).unwrap(), 4096);
        let (mut server, _) = ScramServer::start(
            wrong,
            SCRAM_SHA_256,
            RFC_CLIENT_FIRST.as_bytes(),
            &Binding::Unavailable,
        )
        .unwrap();
        let rfc = rfc_server();
        server.nonce = rfc.nonce.clone();
        server.auth_message_head = rfc.auth_message_head.clone();
        assert_eq!(
            server.finish(RFC_CLIENT_FINAL.as_bytes()).unwrap_err(),
            ScramError::WrongProof
        );
        let mock = hmac::Key::new(hmac::HMAC_SHA256, b"proxy secret");
        let decoy = ScramVerifier::decoy("nobody", &mock);
        assert_eq!(decoy.salt, ScramVerifier::decoy("nobody", &mock).salt);
        assert_ne!(decoy.salt, ScramVerifier::decoy("somebody", &mock).salt);
        let (mut server, _) = ScramServer::start(
            decoy,
            SCRAM_SHA_256,
            RFC_CLIENT_FIRST.as_bytes(),
            &Binding::Unavailable,
        )
        .unwrap();
        server.nonce = rfc.nonce;
        server.auth_message_head = rfc.auth_message_head;
        assert_eq!(
            server.finish(RFC_CLIENT_FINAL.as_bytes()).unwrap_err(),
            ScramError::WrongProof
        );
    }

    /// A full exchange: a client with the password against the proxy, then
    /// the proxy against a "server" holding the same verifier, with the
    /// recovered ClientKey; channel binding on the client side.
    #[test]
    fn recovered_client_key_logs_in_to_a_server_with_the_same_verifier() {
        let verifier = verifier_of("wonder", b"0123456789abcdef", 4096);
        let hash = sha256(b"the proxy's certificate").to_vec();
        let binding = Binding::EndPoint(hash.clone());
        let client_key = {
            // A client with the password, channel binding on.
            let mut salted = [0; KEY_LEN];
            pbkdf2::derive(
                pbkdf2::PBKDF2_HMAC_SHA256,
                std::num::NonZeroU32::new(4096).unwrap(),
                b"0123456789abcdef",
                b"wonder",
                &mut salted,
            );
            hmac_sha256(&salted, b"Client Key")
        };
        let gs2 = "p=tls-server-end-point,,";
        let client_first = format!("{gs2}n=,r=clientnonce");
        let (server, server_first) = ScramServer::start(
            verifier.clone(),
            SCRAM_SHA_256_PLUS,
            client_first.as_bytes(),
            &binding,
        )
        .unwrap();
        let (nonce, _) = attribute(&server_first, 'r').unwrap();
        let mut cbind = gs2.as_bytes().to_vec();
        cbind.extend_from_slice(&hash);
        let without_proof = format!("c={},r={nonce}", BASE64.encode(&cbind));
        let auth_message = format!("n=,r=clientnonce,{server_first},{without_proof}");
        let proof = xor(
            &client_key,
            &hmac_sha256(&sha256(&client_key), auth_message.as_bytes()),
        );
        let client_final = format!("{without_proof},p={}", BASE64.encode(proof));
        let (recovered, _) = server.finish(client_final.as_bytes()).unwrap();
        assert_eq!(recovered.0, client_key);

        // The proxy logs in to a server (here: another ScramServer).
        let (client, first) = ScramClient::start();
        let (server, server_first) = ScramServer::start(
            verifier.clone(),
            SCRAM_SHA_256,
            first.as_bytes(),
            &Binding::Unavailable,
        )
        .unwrap();
        let (pending, client_final, params) = client
            .answer(server_first.as_bytes(), &recovered, &verifier.server_key)
            .unwrap();
        assert_eq!(params.iterations, 4096);
        let (_, server_final) = server.finish(client_final.as_bytes()).unwrap();
        pending.verify(server_final.as_bytes()).unwrap();
    }

    #[test]
    fn binding_downgrades_and_mismatches_are_refused() {
        let verifier = rfc_verifier();
        let tls = Binding::EndPoint(vec![7; 32]);
        let start = |mechanism: &str, first: &str, binding: &Binding| {
            ScramServer::start(verifier.clone(), mechanism, first.as_bytes(), binding).map(|_| ())
        };
        // "y" over TLS: the client was made to think the proxy cannot bind.
        assert!(start(SCRAM_SHA_256, "y,,n=,r=abc", &tls).is_err());
        assert!(start(SCRAM_SHA_256, "y,,n=,r=abc", &Binding::Unavailable).is_ok());
        assert!(start(SCRAM_SHA_256_PLUS, "n,,n=,r=abc", &tls).is_err());
        assert!(start(
            SCRAM_SHA_256_PLUS,
            "p=tls-server-end-point,,n=,r=abc",
            &Binding::Unavailable
        )
        .is_err());
        assert!(start(SCRAM_SHA_256_PLUS, "p=tls-unique,,n=,r=abc", &tls).is_err());
        assert!(start(SCRAM_SHA_256, "n,a=admin,n=,r=abc", &tls).is_err());
        assert!(start(SCRAM_SHA_256, "n,,n=,r=a,b", &tls).is_ok());
        assert!(start(SCRAM_SHA_256, "n,,n=,r=", &tls).is_err());
        // The right binding data, but for another certificate.
        let (server, server_first) = ScramServer::start(
            verifier,
            SCRAM_SHA_256_PLUS,
            b"p=tls-server-end-point,,n=,r=abc",
            &tls,
        )
        .unwrap();
        let (nonce, _) = attribute(&server_first, 'r').unwrap();
        let mut cbind = b"p=tls-server-end-point,,".to_vec();
        cbind.extend_from_slice(&[8; 32]);
        let client_final = format!(
            "c={},r={nonce},p={}",
            BASE64.encode(&cbind),
            BASE64.encode([0; 32])
        );
        assert!(matches!(
            server.finish(client_final.as_bytes()),
            Err(ScramError::Protocol(_))
        ));
    }
}
