//! Who is calling the public API: bearer tokens from a static token file (Kubernetes' format),
//! checked by an interceptor in front of `tessera.v1.Tessera`, which hands each call the caller's
//! [`Principal`] (its tenant). Health and reflection stay open.
//!
//! The token file is CSV, one client per line: `token,user,uid[,"group1,group2"]`. The user is the
//! tenant; the group [`ADMIN_GROUP`] sees and cancels every tenant's jobs, and it and the group
//! [`PRIORITY_GROUP`] may ask for any queue priority (other tenants for at most
//! `QueueLimits::max_priority`). Blank lines and lines
//! starting with `#` are skipped. Only SHA-256 digests of the tokens are kept in memory; a
//! presented token is hashed and compared with every digest in constant time. Tokens are never
//! logged or echoed. The file is read again when it changes (checked at most once a second); a
//! change that does not parse is logged and the tokens already loaded stay in force.

use crate::CoordinatorError;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use subtle::ConstantTimeEq;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The group whose members see and cancel every tenant's jobs (and ask for any priority).
pub const ADMIN_GROUP: &str = "admin";
/// The group whose members may ask for any queue priority.
pub const PRIORITY_GROUP: &str = "priority";
/// The tenant of every caller when the server runs without authentication.
pub const ANONYMOUS: &str = "";
/// Largest token file read (a file this large is a mistake, not a client list).
const MAX_FILE_BYTES: u64 = 16 << 20;
/// How often the token file's metadata is looked at for a change.
const RECHECK: Duration = Duration::from_secs(1);

/// The caller of a public call, as authentication established it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The tenant: the token file's user, or [`ANONYMOUS`] without authentication.
    pub tenant: String,
    /// Sees and cancels every tenant's jobs (the group `admin`, or no authentication at all).
    pub admin: bool,
    /// May ask for any queue priority (the groups `priority` and `admin`, or no authentication).
    pub any_priority: bool,
}

impl Principal {
    /// The caller of a server without authentication: one tenant that sees everything.
    pub fn anonymous() -> Self {
        Self { tenant: ANONYMOUS.to_string(), admin: true, any_priority: true }
    }

    /// Whether this caller may see (and cancel) a job submitted by `tenant`.
    pub fn may_see(&self, tenant: &str) -> bool {
        self.admin || self.tenant == tenant
    }

    /// The tenant whose jobs a listing shows: None for all of them.
    pub fn listing_filter(&self) -> Option<&str> {
        (!self.admin).then_some(self.tenant.as_str())
    }
}

/// One client of the token file (its token's digest only).
#[derive(Clone, Debug)]
struct Client {
    digest: [u8; 32],
    principal: Principal,
}

/// Parses a token file's text. Errors name the line, never the token.
fn parse(text: &str) -> Result<Vec<Client>, String> {
    let mut clients: Vec<Client> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |what: &str| format!("line {}: {what}", n + 1);
        let mut parts = line.splitn(4, ',');
        let token = parts.next().unwrap_or_default().trim();
        let user = parts.next().map(str::trim).ok_or_else(|| at("expected token,user,uid[,\"groups\"]"))?;
        let _uid = parts.next().map(str::trim).ok_or_else(|| at("expected token,user,uid[,\"groups\"]"))?;
        let groups = parts.next().map(|g| g.trim().trim_matches('"')).unwrap_or_default();
        if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(at("the token is empty or holds spaces"));
        }
        let user = user.trim_matches('"');
        if user.is_empty() || user.len() > 256 {
            return Err(at("the user must have 1 to 256 characters"));
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if clients.iter().any(|c| bool::from(c.digest.ct_eq(&digest))) {
            return Err(at("this token is already given on an earlier line"));
        }
        let in_group = |name: &str| groups.split(',').any(|g| g.trim() == name);
        let admin = in_group(ADMIN_GROUP);
        let any_priority = admin || in_group(PRIORITY_GROUP);
        clients.push(Client { digest, principal: Principal { tenant: user.to_string(), admin, any_priority } });
    }
    if clients.is_empty() {
        return Err("no client in the file (every client refused)".into());
    }
    Ok(clients)
}

/// What identifies a version of the file on disk.
type Stamp = (Option<SystemTime>, u64);

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let m = std::fs::metadata(path)?;
    Ok((m.modified().ok(), m.len()))
}

fn read(path: &Path) -> Result<(Stamp, Vec<Client>), String> {
    let s = stamp(path).map_err(|e| e.to_string())?;
    if s.1 > MAX_FILE_BYTES {
        return Err(format!("{} bytes (at most {MAX_FILE_BYTES})", s.1));
    }
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    Ok((s, parse(&text)?))
}

struct Loaded {
    stamp: Stamp,
    checked: Instant,
    clients: Arc<Vec<Client>>,
}

/// A static token file, followed as it changes.
pub struct TokenFile {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

impl TokenFile {
    /// Reads `path` (`--auth-token-file`); an unreadable or malformed file is an error naming
    /// the line.
    pub fn load(path: &Path) -> Result<Self, CoordinatorError> {
        let (stamp, clients) = read(path).map_err(|e| CoordinatorError::invalid_argument("auth_token_file", format!("{}: {e}", path.display())))?;
        tracing::info!(path = %path.display(), clients = clients.len(), "token file loaded");
        Ok(Self { path: path.to_path_buf(), loaded: Mutex::new(Loaded { stamp, checked: Instant::now(), clients: Arc::new(clients) }) })
    }

    /// The clients in force, after reading the file again if it changed.
    fn clients(&self) -> Arc<Vec<Client>> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if loaded.checked.elapsed() >= RECHECK {
            loaded.checked = Instant::now();
            if stamp(&self.path).ok() != Some(loaded.stamp) {
                match read(&self.path) {
                    Ok((stamp, clients)) => {
                        tracing::info!(path = %self.path.display(), clients = clients.len(), "token file changed: reloaded");
                        loaded.stamp = stamp;
                        loaded.clients = Arc::new(clients);
                    }
                    Err(e) => tracing::warn!(path = %self.path.display(), error = %e, "token file changed but cannot be used; the loaded tokens stay"),
                }
            }
        }
        loaded.clients.clone()
    }

    /// The principal `token` belongs to. Every digest is compared, in constant time.
    pub fn authenticate(&self, token: &str) -> Option<Principal> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for c in self.clients().iter() {
            if bool::from(c.digest.ct_eq(&digest)) {
                found = Some(c.principal.clone());
            }
        }
        found
    }
}

/// How the public API authenticates its callers.
#[derive(Clone, Default)]
pub enum Auth {
    /// Nobody is asked: every caller is [`Principal::anonymous`].
    #[default]
    Open,
    /// A bearer token from the file is required.
    Tokens(Arc<TokenFile>),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Open => f.write_str("Open"),
            Self::Tokens(t) => write!(f, "Tokens({})", t.path.display()),
        }
    }
}

/// The UNAUTHENTICATED status (never naming the token).
fn unauthenticated(why: &str) -> Status {
    CoordinatorError::Unauthenticated(why.to_string()).into()
}

/// The bearer token of `authorization` (`Bearer TOKEN`, scheme case-insensitive).
fn bearer(request: &Request<()>) -> Result<&str, Status> {
    let value = request.metadata().get("authorization").ok_or_else(|| unauthenticated("no `authorization: Bearer TOKEN` header"))?;
    let value = value.to_str().map_err(|_| unauthenticated("the authorization header is not text"))?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => Ok(token.trim()),
        _ => Err(unauthenticated("the authorization header is not `Bearer TOKEN`")),
    }
}

impl Interceptor for Auth {
    /// Adds the caller's [`Principal`] to the request's extensions, or refuses it.
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let principal = match self {
            Self::Open => Principal::anonymous(),
            Self::Tokens(file) => file.authenticate(bearer(&request)?).ok_or_else(|| unauthenticated("the token is not valid"))?,
        };
        request.extensions_mut().insert(principal);
        Ok(request)
    }
}

/// The caller of a request that went through [`Auth`] (anonymous for one that did not: the
/// service called directly, in process).
pub fn principal<T>(request: &Request<T>) -> Principal {
    request.extensions().get::<Principal>().cloned().unwrap_or_else(Principal::anonymous)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn with_token(auth: &mut Auth, header: Option<&str>) -> Result<Principal, Status> {
        let mut r = Request::new(());
        if let Some(h) = header {
            r.metadata_mut().insert("authorization", h.parse().unwrap());
        }
        auth.call(r).map(|r| principal(&r))
    }

    #[test]
    fn the_token_file_names_tenants_admins_and_who_may_raise_priority() {
        let text = "# clients\n\nt-alice-0123456789,alice,1\nt-bob-0123456789,bob,2,\"dev,admin\"\n t-carol ,\"carol\",3,\"dev\"\nt-dave-012345,dave,4,\"dev, priority\"\n";
        let clients = parse(text).unwrap();
        let who: Vec<(&str, bool, bool)> = clients.iter().map(|c| (c.principal.tenant.as_str(), c.principal.admin, c.principal.any_priority)).collect();
        assert_eq!(who, [("alice", false, false), ("bob", true, true), ("carol", false, false), ("dave", false, true)]);
        let p = Principal { tenant: "alice".into(), admin: false, any_priority: false };
        assert!(p.may_see("alice") && !p.may_see("bob"));
        assert_eq!(p.listing_filter(), Some("alice"));
        assert_eq!(Principal::anonymous().listing_filter(), None);
    }

    #[test]
    fn malformed_files_are_refused_by_line_without_the_token() {
        for (text, line) in [
            ("secret-token-1\n", "line 1"),
            ("ok-token,alice,1\nsecret-token-2,,2\n", "line 2"),
            ("secret token,alice,1\n", "line 1"),
            ("secret-token-3,alice,1\nsecret-token-3,bob,2\n", "line 2"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.starts_with(line), "{text:?}: {e}");
            assert!(!e.contains("secret"), "the error echoes the token: {e}");
        }
        assert!(parse("# nobody\n").unwrap_err().contains("no client"));
    }

    #[test]
    fn calls_need_a_listed_bearer_token_and_the_file_is_followed() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "tok-alice,alice,1\ntok-root,root,0,\"admin\"").unwrap();
        let file = Arc::new(TokenFile::load(f.path()).unwrap());
        let mut auth = Auth::Tokens(file.clone());
        assert_eq!(with_token(&mut auth, Some("Bearer tok-alice")).unwrap(), Principal { tenant: "alice".into(), admin: false, any_priority: false });
        assert_eq!(with_token(&mut auth, Some("bearer tok-root")).unwrap(), Principal { tenant: "root".into(), admin: true, any_priority: true });
        for header in [None, Some("Bearer nope"), Some("Basic tok-alice"), Some("tok-alice"), Some("Bearer ")] {
            let s = with_token(&mut auth, header).unwrap_err();
            assert_eq!(s.code(), tonic::Code::Unauthenticated, "{header:?}");
            assert!(!s.message().contains("tok-"), "{header:?}: the status echoes the token: {}", s.message());
        }
        assert!(with_token(&mut Auth::Open, None).unwrap().admin);

        // A new file takes effect after the recheck interval; a broken one leaves the old tokens.
        std::fs::write(f.path(), "tok-bob,bob,2\n").unwrap();
        file.loaded.lock().unwrap().checked -= RECHECK;
        assert_eq!(with_token(&mut auth, Some("Bearer tok-bob")).unwrap().tenant, "bob");
        assert!(with_token(&mut auth, Some("Bearer tok-alice")).is_err(), "a removed token still works");
        std::fs::write(f.path(), "broken line without commas and longer\n").unwrap();
        file.loaded.lock().unwrap().checked -= RECHECK;
        assert_eq!(with_token(&mut auth, Some("Bearer tok-bob")).unwrap().tenant, "bob");
        let missing = TokenFile::load(Path::new("/nonexistent/tokens.csv")).err().unwrap();
        assert!(missing.to_string().contains("auth_token_file"), "{missing}");
    }
}
