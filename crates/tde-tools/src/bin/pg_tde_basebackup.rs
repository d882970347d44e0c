//! `pg_tde_basebackup`: the stock `pg_basebackup` for servers that encrypt
//! their WAL, so that the backup holds no plaintext WAL.
//!
//! `pg_basebackup -X stream` receives the WAL written during the backup over
//! a replication connection and writes it itself, in plaintext: it is a client
//! and never passes through pg_tde.  This wrapper runs `pg_basebackup -X fetch`
//! instead, with which the server sends its segment files as they are on disk
//! (encrypted, readable with the `pg_tde/wal_keys` the backup copies), and
//! holds a temporary physical replication slot, reserving WAL from before the
//! backup's start, for as long as it runs, so that no segment the backup needs
//! is removed meanwhile (what `-X stream` guarantees otherwise).  The slot
//! belongs to a `psql` session of the wrapper: it disappears with the session,
//! also when the wrapper is killed.
//!
//! ```text
//! pg_tde_basebackup -h primary -U postgres -D /backups/base -c fast -R
//! ```
//! Every option is passed to `pg_basebackup`; `-X stream` (its default) becomes
//! `-X fetch`, `-X none` stays.  `--slot`/`--create-slot` are refused: the
//! wrapper's own slot does their job.  `pg_basebackup` and `psql` are taken
//! from the directory of this program, where they are installed together.
//! After a plain-format backup, the backup's `pg_tde/wal_keys` is replaced by
//! the server's current file when the server took a WAL key during the
//! backup (a standby's WAL receiver that started again).
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

/// Options of `pg_basebackup` that take a value, in short and long form.
const WITH_VALUE: &[(&str, &str)] = &[
    ("-D", "--pgdata"),
    ("-F", "--format"),
    ("-r", "--max-rate"),
    ("-T", "--tablespace-mapping"),
    ("-t", "--target"),
    ("-X", "--wal-method"),
    ("-Z", "--compress"),
    ("-c", "--checkpoint"),
    ("-l", "--label"),
    ("-s", "--status-interval"),
    ("-d", "--dbname"),
    ("-h", "--host"),
    ("-p", "--port"),
    ("-U", "--username"),
    ("-S", "--slot"),
    ("-i", "--incremental"),
    ("", "--waldir"),
    ("", "--manifest-checksums"),
    ("", "--sync-method"),
];

/// Connection options, passed to `psql` as well.
const CONNECTION: &[&str] = &["-d", "-h", "-p", "-U", "-w", "-W"];

/// One parsed option: its short name (or long name when it has none) and value.
struct Opt {
    name: String,
    value: Option<String>,
}

fn parse(args: &[String]) -> Result<Vec<Opt>, String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if let Some(long) = a.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (format!("--{n}"), Some(v.to_string())),
                None => (a.clone(), None),
            };
            match WITH_VALUE.iter().find(|(_, l)| *l == name) {
                Some((short, _)) => {
                    let value = match inline {
                        Some(v) => v,
                        None => {
                            i += 1;
                            args.get(i - 1).cloned().ok_or_else(|| format!("option {name} needs a value"))?
                        }
                    };
                    let key = if short.is_empty() { name.clone() } else { short.to_string() };
                    out.push(Opt { name: key, value: Some(value) });
                }
                None => out.push(Opt { name, value: inline }),
            }
        } else if a.len() >= 2 && a.starts_with('-') {
            let short = &a[..2];
            if WITH_VALUE.iter().any(|(s, _)| *s == short) {
                let value = if a.len() > 2 {
                    a[2..].to_string()
                } else {
                    let v = args.get(i).cloned().ok_or_else(|| format!("option {short} needs a value"))?;
                    i += 1;
                    v
                };
                out.push(Opt { name: short.to_string(), value: Some(value) });
            } else {
                // flags, possibly grouped (-vP)
                for c in a[1..].chars() {
                    out.push(Opt { name: format!("-{c}"), value: None });
                }
            }
        } else {
            return Err(format!("unexpected argument \"{a}\""));
        }
    }
    Ok(out)
}

fn run(args: &[String]) -> Result<i32, String> {
    let mut opts = parse(args)?;
    if opts.iter().any(|o| o.name == "-S" || o.name == "-C" || o.name == "--create-slot" || o.name == "--no-slot") {
        return Err("--slot, --create-slot and --no-slot do not apply: the wrapper holds a slot of its own".into());
    }
    if opts.iter().any(|o| o.name == "-?" || o.name == "--help" || o.name == "-V" || o.name == "--version") {
        let status =
            Command::new(tde_tools::sibling_program("pg_basebackup")).args(args).status().map_err(|e| e.to_string())?;
        return Ok(status.code().unwrap_or(1));
    }
    let mut wal_none = false;
    opts.retain(|o| {
        if o.name == "-X" {
            wal_none = matches!(o.value.as_deref(), Some("n") | Some("none"));
            false
        } else {
            true
        }
    });
    let mut argv: Vec<String> = Vec::new();
    let mut conn: Vec<String> = Vec::new();
    for o in &opts {
        argv.push(o.name.clone());
        if let Some(v) = &o.value {
            argv.push(v.clone());
        }
        if CONNECTION.contains(&o.name.as_str()) {
            conn.push(o.name.clone());
            if let Some(v) = &o.value {
                conn.push(v.clone());
            }
        }
    }
    argv.push("-X".into());
    argv.push(if wal_none { "none" } else { "fetch" }.into());
    if wal_none {
        let status = Command::new(tde_tools::sibling_program("pg_basebackup"))
            .args(&argv)
            .status()
            .map_err(|e| e.to_string())?;
        let code = status.code().unwrap_or(1);
        if code == 0 {
            checksum_note(&opts);
        }
        return Ok(code);
    }

    // The slot's session: psql reading commands from our pipe.
    let mut psql = Command::new(tde_tools::sibling_program("psql"))
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args(&conn)
        .env("PGDATABASE", std::env::var("PGDATABASE").unwrap_or_else(|_| "postgres".into()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run psql: {e}"))?;
    let slot = format!("pg_tde_basebackup_{}", std::process::id());
    let mut stdin = psql.stdin.take().ok_or("no pipe to psql")?;
    let mut stdout = BufReader::new(psql.stdout.take().ok_or("no pipe from psql")?);
    writeln!(stdin, "SELECT lsn FROM pg_create_physical_replication_slot('{slot}', true, true);")
        .and_then(|_| stdin.flush())
        .map_err(|e| format!("psql: {e}"))?;
    let mut line = String::new();
    stdout.read_line(&mut line).map_err(|e| format!("psql: {e}"))?;
    if line.trim().is_empty() {
        let _ = psql.wait();
        return Err("could not create the temporary replication slot that holds the backup's WAL".into());
    }
    eprintln!("pg_tde_basebackup: WAL from {} on held by temporary slot \"{slot}\"", line.trim());
    let status =
        Command::new(tde_tools::sibling_program("pg_basebackup")).args(&argv).status().map_err(|e| e.to_string())?;
    let code = status.code().unwrap_or(1);
    if code == 0 {
        refresh_wal_keys(&opts, &mut stdin, &mut stdout);
        checksum_note(&opts);
    }
    // Ending the session drops the slot.
    drop(stdin);
    let _ = psql.wait();
    Ok(code)
}

/// The server verifies page checksums while it sends relation files, but it
/// reads encrypted files as they are on disk: their pages look newer than the
/// backup's start (random LSNs), so it skips them without a word.  Say so.
fn checksum_note(opts: &[Opt]) {
    if opts.iter().any(|o| o.name == "-k" || o.name == "--no-verify-checksums") {
        return;
    }
    eprintln!(
        "pg_tde_basebackup: note: the server verified page checksums of plaintext relation files only; it cannot \
         read encrypted ones. To verify those, run pg_tde_checksums --check on the restored backup once it has \
         been started and shut down cleanly."
    );
}

/// The backup copied `pg_tde/wal_keys` before the WAL fetched at its end was
/// written: a key the server took meanwhile (a standby's WAL receiver that
/// started again) would be missing.  In a plain-format backup the file is
/// replaced by the server's current one, read through the slot's session
/// (`pg_read_binary_file`: superuser or `pg_read_server_files`); where that
/// cannot be done, a warning says how to check the backup.
fn refresh_wal_keys(opts: &[Opt], stdin: &mut impl Write, stdout: &mut impl BufRead) {
    let value = |n: &str| opts.iter().rev().find(|o| o.name == n).and_then(|o| o.value.clone());
    let plain = value("-F").is_none_or(|f| f.starts_with('p'));
    let warn = |why: &str| {
        eprintln!(
            "pg_tde_basebackup: warning: the backup's pg_tde/wal_keys was not refreshed ({why}); if the server is a \
             standby whose WAL receiver restarted during the backup, check the backup's WAL with pg_tde_decrypt_wal"
        )
    };
    let Some(dir) = value("-D").filter(|d| plain && d != "-") else {
        return warn("not a plain-format backup");
    };
    let query = "SELECT coalesce(encode(pg_read_binary_file('pg_tde/wal_keys', 0, 268435456, true), 'hex'), '');";
    let mut line = String::new();
    if writeln!(stdin, "{query}").and_then(|_| stdin.flush()).is_err() || stdout.read_line(&mut line).is_err() {
        return warn("the server's file could not be read");
    }
    let hex = line.trim();
    if hex.is_empty() || !hex.len().is_multiple_of(2) {
        return warn("the server's file could not be read");
    }
    let Ok(current) =
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16)).collect::<Result<Vec<u8>, _>>()
    else {
        return warn("the server's file could not be read");
    };
    let path = PathBuf::from(dir).join("pg_tde/wal_keys");
    if std::fs::read(&path).is_ok_and(|copied| copied == current) {
        return;
    }
    let tmp = path.with_extension("tmp");
    match std::fs::write(&tmp, &current)
        .and_then(|_| std::fs::File::open(&tmp).and_then(|f| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, &path))
    {
        Ok(()) => {
            eprintln!("pg_tde_basebackup: pg_tde/wal_keys refreshed: the server took a WAL key during the backup")
        }
        Err(e) => warn(&format!("cannot write \"{}\": {e}", path.display())),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(code.clamp(1, 255) as u8),
        Err(e) => {
            eprintln!("pg_tde_basebackup: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(args: &[&str]) -> Vec<(String, Option<String>)> {
        let v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        parse(&v).unwrap().into_iter().map(|o| (o.name, o.value)).collect()
    }

    #[test]
    fn options_in_every_form() {
        let got = names(&["-D", "/b", "-Xstream", "--host=/tmp", "-p", "5432", "-vP", "--wal-method", "s", "-R"]);
        let want = [
            ("-D", Some("/b")),
            ("-X", Some("stream")),
            ("-h", Some("/tmp")),
            ("-p", Some("5432")),
            ("-v", None),
            ("-P", None),
            ("-X", Some("s")),
            ("-R", None),
        ];
        assert_eq!(got.len(), want.len());
        for ((n, v), (wn, wv)) in got.iter().zip(want) {
            assert_eq!((n.as_str(), v.as_deref()), (wn, wv));
        }
        assert!(parse(&["-D".to_string()]).is_err());
    }
}
