//! `pg_tde_change_key_provider`: change a key provider's settings in the
//! `$PGDATA/pg_tde` of a stopped cluster, for when the KMS or the keyring file
//! moved while the server was down and it cannot start without the new
//! settings.
//!
//! ```text
//! pg_tde_change_key_provider [-D DATADIR] [--skip-verify] <dbOid|global> <provider_name> file <path>
//! pg_tde_change_key_provider [-D DATADIR] [--skip-verify] <dbOid|global> <provider_name> vault-v2 <url> <mount_path> <token_path> [<ca_path> [<namespace>]]
//! pg_tde_change_key_provider [-D DATADIR] [--skip-verify] <dbOid|global> <provider_name> kmip <host> <port> <cert_path> <key_path> <ca_path>
//! ```
//!
//! It refuses to run while the cluster's postmaster is alive, and (unless
//! `--skip-verify`) unless every principal key in use through the provider is
//! reachable with the new settings and identical to the key in use.  The change
//! is not WAL-logged: run it on every server of a replicated cluster.
#![forbid(unsafe_code)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::{json, Value};
use tde_core::keymap::{self, KeyMapHeader};
use tde_core::providers_catalog::{open_provider_in, validate_options, ProviderCatalog, ProviderRecord, GLOBAL_DB_OID};
use tde_core::ProviderKind;

const USAGE: &str = "usage:
  pg_tde_change_key_provider [-D DATADIR] [--skip-verify] <dbOid|global> <provider_name> file <path>
  pg_tde_change_key_provider [-D DATADIR] [--skip-verify] <dbOid|global> <provider_name> vault-v2 <url> <mount_path> <token_path> [<ca_path> [<namespace>]]
  pg_tde_change_key_provider [-D DATADIR] [--skip-verify] <dbOid|global> <provider_name> kmip <host> <port> <cert_path> <key_path> <ca_path>
DATADIR defaults to $PGDATA.";

struct Args {
    datadir: PathBuf,
    skip_verify: bool,
    db_oid: u32,
    provider_name: String,
    kind: ProviderKind,
    options: Value,
}

fn parse_args(argv: &[String]) -> Result<Args, String> {
    let mut datadir = std::env::var_os("PGDATA").map(PathBuf::from);
    let mut skip_verify = false;
    let mut rest = Vec::new();
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-D" | "--pgdata" => datadir = Some(PathBuf::from(it.next().ok_or("-D needs a directory")?)),
            "--skip-verify" => skip_verify = true,
            "-h" | "--help" => return Err(String::new()),
            _ => rest.push(a.clone()),
        }
    }
    let datadir = datadir.ok_or("no data directory: use -D or set PGDATA")?;
    if rest.len() < 4 {
        return Err("too few arguments".into());
    }
    let db_oid = if rest[0] == "global" {
        GLOBAL_DB_OID
    } else {
        rest[0].parse::<u32>().map_err(|_| format!("invalid database OID \"{}\"", rest[0]))?
    };
    let provider_name = rest[1].clone();
    let kind =
        ProviderKind::from_type_name(&rest[2]).ok_or_else(|| format!("unknown provider type \"{}\"", rest[2]))?;
    let p = &rest[3..];
    let options = match (kind, p.len()) {
        (ProviderKind::File, 1) => json!({ "path": p[0] }),
        (ProviderKind::VaultV2, 3..=5) => {
            let mut o = json!({ "url": p[0], "mountPath": p[1], "tokenPath": p[2] });
            if let Some(ca) = p.get(3) {
                o["caPath"] = ca.clone().into();
            }
            if let Some(ns) = p.get(4) {
                o["namespace"] = ns.clone().into();
            }
            o
        }
        (ProviderKind::Kmip, 5) => {
            let port: u16 = p[1].parse().map_err(|_| format!("invalid port \"{}\"", p[1]))?;
            json!({ "host": p[0], "port": port, "certPath": p[2], "keyPath": p[3], "caPath": p[4] })
        }
        _ => return Err(format!("wrong number of parameters for provider type \"{}\"", kind.type_name())),
    };
    Ok(Args { datadir, skip_verify, db_oid, provider_name, kind, options })
}

/// The PID in `postmaster.pid`, if that process is alive.
fn running_postmaster(datadir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(datadir.join("postmaster.pid")).ok()?;
    let pid: u32 = text.lines().next()?.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

/// Every key-map header in `dir` that uses provider `id`.
fn headers_using(dir: &Path, id: i32) -> Result<Vec<(PathBuf, KeyMapHeader)>, String> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot list \"{}\": {e}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.ends_with("_keys") || name == "default_key" || name == "server_key") {
            continue;
        }
        let (header, _) = keymap::read(&entry.path()).map_err(|e| e.to_string())?;
        if header.principal.provider_id == id {
            out.push((entry.path(), header));
        }
    }
    Ok(out)
}

fn run(args: Args) -> Result<(), String> {
    if let Some(pid) = running_postmaster(&args.datadir) {
        return Err(format!(
            "the cluster in \"{}\" is running (postmaster PID {pid}); stop it first, or use pg_tde_change_{}_key_provider() in SQL",
            args.datadir.display(),
            if args.db_oid == GLOBAL_DB_OID { "global" } else { "database" }
        ));
    }
    let tde_dir = args.datadir.join("pg_tde");
    let catalog_path = tde_dir.join("providers.json");
    if !catalog_path.exists() {
        return Err(format!("\"{}\" does not exist: is this a pg_tde data directory?", catalog_path.display()));
    }
    validate_options(args.kind, &args.options).map_err(|e| e.to_string())?;
    let mut catalog = ProviderCatalog::load(&catalog_path).map_err(|e| e.to_string())?;
    let id = catalog
        .providers
        .iter()
        .find(|p| p.db_oid == args.db_oid && p.name == args.provider_name)
        .map(|p| p.id)
        .ok_or_else(|| format!("key provider \"{}\" does not exist in that scope", args.provider_name))?;
    if !args.skip_verify {
        let probe = ProviderRecord {
            id,
            name: args.provider_name.clone(),
            kind: args.kind,
            options: args.options.clone(),
            db_oid: args.db_oid,
        };
        let provider = open_provider_in(&probe, &tde_dir).map_err(|e| e.to_string())?;
        for (path, header) in headers_using(&tde_dir, id)? {
            let key = provider.get_key(&header.principal.name).map_err(|e| e.to_string())?.ok_or_else(|| {
                format!(
                    "principal key \"{}\" (used by {}) not found with the new settings",
                    header.principal.name,
                    path.display()
                )
            })?;
            header
                .verify_principal(&key.key)
                .map_err(|_| format!("principal key \"{}\" differs with the new settings", header.principal.name))?;
        }
    }
    catalog.change(id, args.kind, args.options).map_err(|e| e.to_string())?;
    catalog.save_atomic(&catalog_path).map_err(|e| e.to_string())?;
    // Run as root, the new file would belong to root: give it to the owner of
    // the data directory, as the server must read it.
    let owner = std::fs::metadata(&tde_dir).map_err(|e| format!("cannot stat \"{}\": {e}", tde_dir.display()))?;
    std::os::unix::fs::chown(&catalog_path, Some(owner.uid()), Some(owner.gid()))
        .map_err(|e| format!("cannot give \"{}\" to the data directory's owner: {e}", catalog_path.display()))?;
    println!("key provider \"{}\" changed", args.provider_name);
    Ok(())
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("pg_tde_change_key_provider: {msg}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("pg_tde_change_key_provider: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
