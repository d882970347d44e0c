//! `pg_tde_amcheck`: `pg_amcheck`, and the same checks for `tde_heap` tables.
//!
//! ```text
//! pg_tde_amcheck [pg_amcheck options...]
//! ```
//! `pg_amcheck` selects tables whose access method is `heap`, and indexes of
//! such tables only: `tde_heap` tables and their indexes are skipped without a
//! word.  This wrapper runs `pg_amcheck` with every option as given, then, in
//! each database it names (`-d`/`--database`, else `--all`'s, else the
//! connection's default), checks every `tde_heap` table with
//! `verify_heapam(…, check_toast => true)` and each of their valid B-tree
//! indexes with `bt_index_check(…, heapallindexed => true)` (amcheck's
//! functions; core patch 0007 lets `verify_heapam` read heap-based AMs).
//! Corruption is printed as `pg_amcheck` prints it and makes the exit status
//! 2, as `pg_amcheck` does; `amcheck` must be installed in those databases
//! (`pg_amcheck --install-missing` does it).
#![forbid(unsafe_code)]

use std::process::{Command, ExitCode};

use tde_tools::{option_values, sibling_program};

/// Options of `pg_amcheck` that take a value and that psql understands too.
const CONNECTION: &[(&str, &str)] = &[("-h", "--host"), ("-p", "--port"), ("-U", "--username")];

const HEAP_CHECK: &str = "SELECT current_database() || '.' || n.nspname || '.' || c.relname, \
     coalesce(v.blkno::text, ''), coalesce(v.offnum::text, ''), coalesce(v.attnum::text, ''), v.msg \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_am a ON a.oid = c.relam, \
     LATERAL verify_heapam(c.oid, check_toast => true) v \
     WHERE a.amname = 'tde_heap' AND c.relpersistence <> 't' ORDER BY 1, 2";

const TABLE_COUNT: &str = "SELECT count(*) FROM pg_class c JOIN pg_am a ON a.oid = c.relam \
     WHERE a.amname = 'tde_heap' AND c.relpersistence <> 't'";

const INDEX_LIST: &str = "SELECT i.indexrelid FROM pg_index i \
     JOIN pg_class t ON t.oid = i.indrelid JOIN pg_am ta ON ta.oid = t.relam \
     JOIN pg_class x ON x.oid = i.indexrelid JOIN pg_am xa ON xa.oid = x.relam \
     WHERE ta.amname = 'tde_heap' AND xa.amname = 'btree' AND i.indisvalid AND t.relpersistence <> 't' ORDER BY 1";

/// The value of each occurrence of an option (`-x V`, `-xV`, `--long V`, `--long=V`).
fn values(args: &[String], short: &str, long: &str) -> Vec<String> {
    option_values(args, short, long, &[])
}

/// Run one query in `db` through psql; its rows, fields separated by `\x1f`.
fn query(conn: &[String], db: &str, sql: &str) -> Result<Vec<Vec<String>>, String> {
    let out = Command::new(sibling_program("psql"))
        .args(["-X", "-q", "-A", "-t", "-F", "\u{1f}", "-v", "ON_ERROR_STOP=1"])
        .args(conn)
        .args(["-d", db, "-c", sql])
        .output()
        .map_err(|e| format!("cannot run psql: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.split('\u{1f}').map(str::to_string).collect())
        .collect())
}

fn run(args: &[String]) -> Result<u8, String> {
    let status = Command::new(sibling_program("pg_amcheck"))
        .args(args)
        .status()
        .map_err(|e| format!("cannot run pg_amcheck: {e}"))?;
    let mut code = u8::try_from(status.code().unwrap_or(1)).unwrap_or(1);
    if args.iter().any(|a| matches!(a.as_str(), "-?" | "--help" | "-V" | "--version")) {
        return Ok(code);
    }
    let verbose = args.iter().any(|a| a == "-v" || a == "--verbose");
    let mut conn = Vec::new();
    for (short, long) in CONNECTION {
        if let Some(v) = values(args, short, long).pop() {
            conn.push(short.to_string());
            conn.push(v);
        }
    }
    let mut databases = values(args, "-d", "--database");
    if databases.is_empty() && args.iter().any(|a| a == "-a" || a == "--all") {
        let maintenance = values(args, "", "--maintenance-db").pop().unwrap_or_else(|| "postgres".into());
        databases = query(&conn, &maintenance, "SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1")?
            .into_iter()
            .filter_map(|r| r.into_iter().next())
            .collect();
    }
    if databases.is_empty() {
        databases.push(std::env::var("PGDATABASE").unwrap_or_else(|_| "postgres".into()));
    }
    for db in &databases {
        let tables = query(&conn, db, TABLE_COUNT)?.first().and_then(|r| r.first().cloned()).unwrap_or_default();
        if tables == "0" {
            continue;
        }
        if verbose {
            eprintln!("pg_tde_amcheck: checking {tables} tde_heap tables in database \"{db}\"");
        }
        match query(&conn, db, HEAP_CHECK) {
            Ok(rows) => {
                for r in rows {
                    if let [rel, blk, off, att, msg] = r.as_slice() {
                        let mut at = format!("heap table \"{rel}\"");
                        for (what, v) in [("block", blk), ("offset", off), ("attribute", att)] {
                            if !v.is_empty() {
                                at.push_str(&format!(", {what} {v}"));
                            }
                        }
                        println!("{at}:\n    {msg}");
                        code = code.max(2);
                    }
                }
            }
            Err(e) => {
                eprintln!("pg_tde_amcheck: error: checking tde_heap tables in database \"{db}\": {e}");
                code = code.max(1);
            }
        }
        for row in query(&conn, db, INDEX_LIST)? {
            let Some(oid) = row.first() else { continue };
            let check = format!("SELECT {oid}::regclass::text, bt_index_check({oid}, heapallindexed => true)");
            match query(&conn, db, &check) {
                Ok(r) => {
                    if verbose {
                        let name = r.first().and_then(|r| r.first().cloned()).unwrap_or_default();
                        eprintln!("pg_tde_amcheck: checked btree index \"{db}.{name}\" of a tde_heap table");
                    }
                }
                Err(e) => {
                    println!("btree index {oid} in database \"{db}\":\n    {e}");
                    code = code.max(2);
                }
            }
        }
    }
    Ok(code)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("pg_tde_amcheck: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_values() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(values(&a(&["-d", "x", "--database=y", "-dz"]), "-d", "--database"), ["x", "y", "z"]);
        assert_eq!(values(&a(&["-v", "--maintenance-db", "m"]), "", "--maintenance-db"), ["m"]);
        assert!(values(&a(&["-v"]), "", "--maintenance-db").is_empty());
    }
}
