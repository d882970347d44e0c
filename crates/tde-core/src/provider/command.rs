//! The external-command provider (`command`): a KMS adapter program wraps and unwraps.
//!
//! Options (a flat JSON object):
//!
//! | option    | required | meaning                                                          |
//! |-----------|----------|------------------------------------------------------------------|
//! | `command` | yes      | absolute path of the adapter executable                          |
//! | `args`    | no       | array of strings passed as its arguments (no secrets: options are listed and WAL-logged) |
//! | `timeout` | no       | seconds an operation may take, 1 to 600, default 30              |
//!
//! The adapter runs without a shell, as the server's OS user, in its own process group,
//! with the server's environment (pg_tde adds nothing to it). pg_tde writes one JSON
//! request to its standard input and closes it:
//!
//! ```json
//! {"version": 1, "operation": "wrap" | "unwrap" | "verify", "key_id": "…", "data": "<base64>"}
//! ```
//!
//! and reads one JSON reply from its standard output: `{"status": "ok", "data": "<base64>",
//! "key_version": "…"}` (`data`: the ciphertext for `wrap`, the key for `unwrap`, absent for
//! `verify`), or `{"status": "denied" | "unavailable", "message": "…"}`. Key material
//! travels only through the two pipes, into buffers that are wiped. A `denied` reply is
//! [`TdeError::Refused`]; a crash, a timeout (the process group is killed) or an
//! unreadable reply is [`TdeError::Provider`] with the first bytes of the adapter's
//! standard error. `contrib/kms-adapters/` has adapters for AWS KMS, Azure Key Vault,
//! Google Cloud KMS and OpenBao Transit, and documents the protocol.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use zeroize::{Zeroize, Zeroizing};

use super::wrapping::{KeyWrapper, WrappedKey};
use crate::error::{Result, TdeError};
use crate::secret_buf::{read_secret, SecretBuf, SecretRead};

/// Default and largest time an adapter may take for one operation.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_TIMEOUT_SECS: u64 = 600;
/// Largest reply read from an adapter's standard output.
const MAX_REPLY_BYTES: usize = 64 * 1024;
/// Bytes of the adapter's standard error kept for error messages.
const MAX_STDERR_BYTES: usize = 1000;
const PROTOCOL_VERSION: u32 = 1;

/// The validated options of a `command` provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandOptions {
    /// Absolute path of the adapter.
    pub command: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Time allowed per operation.
    pub timeout: Duration,
}

fn invalid(msg: impl Into<String>) -> TdeError {
    TdeError::Invalid(msg.into())
}

/// Validate the options of a `command` provider (see the module documentation).
pub fn parse_command_options(options: &Value) -> Result<CommandOptions> {
    let obj = options.as_object().ok_or_else(|| invalid("command key provider options must be a JSON object"))?;
    if let Some(unknown) = obj.keys().find(|k| !["command", "args", "timeout"].contains(&k.as_str())) {
        return Err(invalid(format!(
            "unknown option \"{unknown}\" for a command key provider (allowed: \"command\", \"args\", \"timeout\")"
        )));
    }
    let command = match obj.get("command") {
        Some(Value::String(s)) if !s.contains('\0') => PathBuf::from(s),
        Some(_) => return Err(invalid("option \"command\" must be a string without NUL characters")),
        None => return Err(invalid("command key provider needs the option \"command\"")),
    };
    if !command.is_absolute() || command.file_name().is_none() {
        return Err(invalid(format!(
            "option \"command\" must be the absolute path of a program, got \"{}\"",
            command.display()
        )));
    }
    let args = match obj.get("args") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) if !s.contains('\0') => Ok(s.clone()),
                _ => Err(invalid("option \"args\" must be an array of strings without NUL characters")),
            })
            .collect::<Result<Vec<_>>>()?,
        Some(_) => return Err(invalid("option \"args\" must be an array of strings")),
    };
    let timeout = match obj.get("timeout") {
        None | Some(Value::Null) => DEFAULT_TIMEOUT,
        Some(v) => match v.as_u64() {
            Some(s @ 1..=MAX_TIMEOUT_SECS) => Duration::from_secs(s),
            _ => {
                return Err(invalid(format!(
                    "option \"timeout\" must be a whole number of seconds from 1 to {MAX_TIMEOUT_SECS}"
                )))
            }
        },
    };
    Ok(CommandOptions { command, args, timeout })
}

#[derive(Serialize)]
struct Request<'a> {
    version: u32,
    operation: &'a str,
    key_id: &'a str,
    data: &'a str,
}

#[derive(Deserialize)]
struct Reply {
    status: String,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    key_version: Option<Value>,
    #[serde(default)]
    message: Option<String>,
}

impl Drop for Reply {
    fn drop(&mut self) {
        self.data.zeroize();
    }
}

/// An external KMS adapter as a [`KeyWrapper`].
#[derive(Debug)]
pub struct CommandWrapper {
    opts: CommandOptions,
}

impl CommandWrapper {
    /// A wrapper running the adapter `opts` names (not run yet).
    pub fn new(opts: CommandOptions) -> Self {
        CommandWrapper { opts }
    }

    fn error(&self, msg: impl std::fmt::Display) -> TdeError {
        TdeError::Provider(format!("KMS adapter \"{}\": {msg}", self.opts.command.display()))
    }

    /// Run one operation; the `ok` reply's data (decoded) and key version.
    #[allow(clippy::type_complexity)]
    fn call(&self, operation: &str, key_id: &str, data: &[u8]) -> Result<(Option<Zeroizing<Vec<u8>>>, Option<String>)> {
        let encoded = Zeroizing::new(BASE64.encode(data));
        let mut request = SecretBuf::with_capacity(128 + encoded.len());
        serde_json::to_writer(&mut request, &Request { version: PROTOCOL_VERSION, operation, key_id, data: &encoded })
            .map_err(|e| self.error(format_args!("could not encode the request: {e}")))?;
        let (stdout, stderr) = self.run(&request)?;
        let reply: Reply = match serde_json::from_slice(&stdout) {
            Ok(r) => r,
            Err(e) => {
                return Err(self.error(format_args!(
                    "{operation} of key \"{key_id}\": the adapter's reply is not a JSON reply (error at line {}, column {}){}",
                    e.line(),
                    e.column(),
                    stderr_note(&stderr)
                )))
            }
        };
        let message = reply.message.clone().unwrap_or_default();
        match reply.status.as_str() {
            "ok" => {}
            "denied" => {
                return Err(TdeError::Refused(format!(
                    "KMS adapter \"{}\": {operation} of key \"{key_id}\" denied: {message}",
                    self.opts.command.display()
                )))
            }
            "unavailable" => {
                return Err(self.error(format_args!("{operation} of key \"{key_id}\": KMS unavailable: {message}")))
            }
            other => {
                return Err(
                    self.error(format_args!("{operation} of key \"{key_id}\": unknown reply status \"{other}\""))
                )
            }
        }
        let data = match &reply.data {
            None => None,
            Some(d) => Some(Zeroizing::new(BASE64.decode(d.as_bytes()).map_err(|_| {
                self.error(format_args!("{operation} of key \"{key_id}\": the reply's \"data\" is not base64"))
            })?)),
        };
        let version = match &reply.key_version {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(_) => return Err(self.error(format_args!("{operation}: \"key_version\" must be a string"))),
        };
        Ok((data, version))
    }

    /// Start the adapter, send the request, collect its output within the timeout.
    fn run(&self, request: &[u8]) -> Result<(Zeroizing<Vec<u8>>, Vec<u8>)> {
        let mut child = Command::new(&self.opts.command)
            .args(&self.opts.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| self.error(format_args!("could not be started: {e}")))?;
        let deadline = Instant::now() + self.opts.timeout;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let out: JoinHandle<std::io::Result<SecretRead>> =
            std::thread::spawn(move || read_secret(&mut stdout, 4096, MAX_REPLY_BYTES));
        let err: JoinHandle<Vec<u8>> = std::thread::spawn(move || {
            let mut kept = Vec::new();
            let _ = (&mut stderr).take(MAX_STDERR_BYTES as u64).read_to_end(&mut kept);
            // Drain the rest so that the adapter never blocks on a full pipe.
            let _ = std::io::copy(&mut stderr, &mut std::io::sink());
            kept
        });
        // A broken pipe (the adapter did not read) shows in its reply or exit status.
        let _ = stdin.write_all(request);
        drop(stdin);
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    kill_group(&mut child);
                    return Err(self.error(format_args!(
                        "no reply within {} s; the adapter was killed",
                        self.opts.timeout.as_secs()
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(self.error(format_args!("waiting for it failed: {e}"))),
            }
        };
        // Whatever the adapter left running (and holding the pipes) goes with it.
        kill_group(&mut child);
        let stderr = err.join().unwrap_or_default();
        let stdout = match out.join() {
            Ok(Ok(SecretRead::Complete(buf))) => buf.into_inner(),
            Ok(Ok(SecretRead::TooLarge)) => {
                return Err(self.error(format_args!("its reply is larger than {MAX_REPLY_BYTES} bytes")))
            }
            Ok(Err(e)) => return Err(self.error(format_args!("reading its reply failed: {e}"))),
            Err(_) => return Err(self.error("reading its reply failed")),
        };
        if !status.success() && stdout.iter().all(u8::is_ascii_whitespace) {
            return Err(self.error(format_args!("it failed ({status}) without a reply{}", stderr_note(&stderr))));
        }
        Ok((stdout, stderr))
    }
}

/// Kill the adapter and whatever it started (its process group), then reap it.
fn kill_group(child: &mut Child) {
    let kill = ["/bin/kill", "/usr/bin/kill"].into_iter().find(|p| std::path::Path::new(p).exists()).unwrap_or("kill");
    let _ = Command::new(kill)
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

fn stderr_note(stderr: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(stderr).chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!("; its standard error: {text}")
    }
}

impl KeyWrapper for CommandWrapper {
    /// Keys of an external KMS are created there; the wrap and unwrap that follow prove
    /// that this one can be used.
    fn prepare_key(&self, _kms_key_id: &str) -> Result<()> {
        self.check()
    }

    fn wrap(&self, kms_key_id: &str, plaintext: &[u8]) -> Result<WrappedKey> {
        let (data, version) = self.call("wrap", kms_key_id, plaintext)?;
        let blob = data.filter(|d| !d.is_empty()).ok_or_else(|| self.error("wrap: the reply has no \"data\""))?;
        Ok(WrappedKey { kms_key_id: kms_key_id.to_string(), kms_key_version: version, blob: blob.to_vec() })
    }

    fn unwrap(&self, wrapped: &WrappedKey) -> Result<Zeroizing<Vec<u8>>> {
        let (data, _) = self.call("unwrap", &wrapped.kms_key_id, &wrapped.blob)?;
        data.ok_or_else(|| self.error("unwrap: the reply has no \"data\""))
    }

    fn verify(&self, wrapped: &WrappedKey) -> Result<()> {
        self.call("verify", &wrapped.kms_key_id, &wrapped.blob).map(|_| ())
    }

    fn rewrap(&self, _wrapped: &WrappedKey) -> Result<Option<WrappedKey>> {
        Ok(None)
    }

    fn check(&self) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(&self.opts.command).map_err(|e| self.error(format_args!("{e}")))?;
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            return Err(self.error("is not an executable file"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn options() {
        let o = parse_command_options(&json!({"command": "/usr/bin/x", "args": ["-a", "b"], "timeout": 5})).unwrap();
        assert_eq!(o.args, ["-a", "b"]);
        assert_eq!(o.timeout, Duration::from_secs(5));
        assert_eq!(parse_command_options(&json!({"command": "/x"})).unwrap().timeout, DEFAULT_TIMEOUT);
        for bad in [
            json!({}),
            json!({"command": "x"}),
            json!({"command": "/x", "args": "a"}),
            json!({"command": "/x", "args": [1]}),
            json!({"command": "/x", "timeout": 0}),
            json!({"command": "/x", "timeout": 601}),
            json!({"command": "/x", "timeout": "5"}),
            json!({"command": "/x", "env": {}}),
        ] {
            assert!(matches!(parse_command_options(&bad), Err(TdeError::Invalid(_))), "{bad}");
        }
    }

    /// An adapter written in sh for the tests: XORs nothing, just echoes per case.
    fn adapter(dir: &std::path::Path, body: &str) -> CommandWrapper {
        let path = dir.join("adapter");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        CommandWrapper::new(CommandOptions { command: path, args: vec![], timeout: Duration::from_secs(2) })
    }

    #[test]
    fn replies_are_interpreted() {
        let dir = tempfile::tempdir().unwrap();
        let ok = adapter(dir.path(), r#"cat >/dev/null; echo '{"status": "ok", "data": "AAEC", "key_version": 3}'"#);
        let w = ok.wrap("k", b"secret").unwrap();
        assert_eq!((w.blob.as_slice(), w.kms_key_version.as_deref()), (&[0u8, 1, 2][..], Some("3")));
        let denied = adapter(dir.path(), r#"cat >/dev/null; echo '{"status": "denied", "message": "key disabled"}'"#);
        match denied.unwrap(&w) {
            Err(TdeError::Refused(m)) => assert!(m.contains("key disabled"), "{m}"),
            other => panic!("{other:?}"),
        }
        let down = adapter(dir.path(), r#"cat >/dev/null; echo '{"status": "unavailable", "message": "no route"}'"#);
        assert!(matches!(down.verify(&w), Err(TdeError::Provider(m)) if m.contains("no route")));
        let crash = adapter(dir.path(), "cat >/dev/null; echo 'boom happened' >&2; exit 3");
        assert!(matches!(crash.verify(&w), Err(TdeError::Provider(m)) if m.contains("boom happened")));
        let garbage = adapter(dir.path(), "cat >/dev/null; echo 'not json'");
        assert!(matches!(garbage.verify(&w), Err(TdeError::Provider(m)) if m.contains("not a JSON reply")));
    }

    #[test]
    fn the_request_reaches_stdin_only() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let a = adapter(
            dir.path(),
            &format!(
                r#"cat > {log}; echo "$@" >> {log}; env >> {log}; echo '{{"status": "ok", "data": "AQ=="}}'"#,
                log = log.display()
            ),
        );
        a.wrap("key-1", b"plaintext-key-bytes").unwrap();
        let seen = std::fs::read_to_string(&log).unwrap();
        let request: Value = serde_json::from_str(seen.lines().next().unwrap()).unwrap();
        assert_eq!(request["operation"], "wrap");
        assert_eq!(request["key_id"], "key-1");
        assert_eq!(request["version"], 1);
        assert_eq!(BASE64.decode(request["data"].as_str().unwrap()).unwrap(), b"plaintext-key-bytes");
        let encoded = BASE64.encode(b"plaintext-key-bytes");
        assert_eq!(seen.matches(&encoded).count(), 1, "the key only in the request: {seen}");
    }

    #[test]
    fn a_grandchild_holding_the_pipes_does_not_hold_up_the_reply() {
        let dir = tempfile::tempdir().unwrap();
        let a = adapter(dir.path(), r#"cat >/dev/null; sleep 30 & echo '{"status": "ok"}'; exit 0"#);
        let started = Instant::now();
        a.verify(&WrappedKey { kms_key_id: "k".into(), kms_key_version: None, blob: vec![1] }).unwrap();
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    }

    #[test]
    fn a_hanging_adapter_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let a = adapter(dir.path(), "sleep 30 & wait");
        let started = Instant::now();
        assert!(matches!(a.check().and_then(|_| a.verify(&WrappedKey {
            kms_key_id: "k".into(),
            kms_key_version: None,
            blob: vec![1],
        })), Err(TdeError::Provider(m)) if m.contains("killed")));
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
