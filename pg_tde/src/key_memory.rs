//! Keeping the shared key caches out of core dumps and swap.
//!
//! The principal-key cache and (on 18) the per-AIO-handle key slots hold key
//! material in PostgreSQL's shared memory.  When the postmaster has created
//! shared memory, the pages that hold them are marked `MADV_DONTDUMP` (the
//! flag is inherited by every child the postmaster forks, so no process's core
//! dump contains them) and locked with `mlock` (locked pages stay in RAM for
//! every process that maps them, as long as the postmaster holds the lock).
//!
//! Shared memory is one mapping, so the ranges are rounded out to whole pages
//! (huge pages when the server uses them): a few neighbouring bytes of other
//! shared structures are excluded from dumps too.  Huge pages are not locked:
//! they are never swapped.  Where the OS refuses
//! (`RLIMIT_MEMLOCK` too low for the lock, a kernel without `MADV_DONTDUMP`),
//! the server starts anyway and says so in its log once per start.

use std::ffi::CStr;

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

static mut PREV_SHMEM_STARTUP: pg_sys::shmem_startup_hook_type = None;

/// Install the hook.  Must run after every module that allocates shared key
/// memory has installed its own startup hook: hooks run last-installed first,
/// and this one lets the others allocate before it looks.
pub fn init() {
    // SAFETY: _PG_init, in the postmaster, before shared memory exists; the
    // hook chain is a plain function pointer.
    unsafe {
        PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    // SAFETY: chaining the hook that was installed before ours.
    unsafe {
        if let Some(prev) = PREV_SHMEM_STARTUP {
            prev();
        }
    }
    // SAFETY: plain read of a process-global flag.
    if unsafe { (&raw const pg_sys::IsUnderPostmaster).read() } {
        // A child attaching to existing shared memory (EXEC_BACKEND builds):
        // the postmaster has protected it already.
        return;
    }
    let principal_cache = Some(crate::keys::principal_cache_region());
    #[cfg(feature = "pg18")]
    let aio_slots = crate::aio_read::key_slots_region();
    #[cfg(not(feature = "pg18"))]
    let aio_slots = None;
    protect(&[principal_cache, aio_slots].into_iter().flatten().collect::<Vec<_>>());
}

/// Whether the server got huge pages for shared memory.
fn huge_pages() -> bool {
    // SAFETY: GetConfigOption with missing_ok does not raise; the returned
    // string is PostgreSQL's, valid for the duration of this call.
    unsafe {
        let s = pg_sys::GetConfigOption(c"huge_pages_status".as_ptr(), true, false);
        !s.is_null() && CStr::from_ptr(s).to_bytes() == b"on"
    }
}

/// The page size of the shared memory mapping: the huge page size when the
/// server got huge pages.
fn shared_memory_page_size() -> usize {
    if huge_pages() {
        // SAFETY: as above.
        let configured = unsafe {
            let s = pg_sys::GetConfigOption(c"huge_page_size".as_ptr(), true, false);
            (!s.is_null()).then(|| CStr::from_ptr(s).to_string_lossy().into_owned())
        };
        if let Some(bytes) = configured.as_deref().and_then(parse_kb_setting).filter(|&b| b > 0) {
            return bytes;
        }
        if let Some(bytes) = default_huge_page_size() {
            return bytes;
        }
    }
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page).ok().filter(|&p| p > 0).unwrap_or(4096)
}

/// `"2MB"`, `"1GB"`, `"0"` (a memory setting as SHOW prints it) in bytes.
fn parse_kb_setting(s: &str) -> Option<usize> {
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let n: usize = digits.parse().ok()?;
    let unit = match &s[digits.len()..] {
        "" | "kB" => 1024,
        "MB" => 1024 * 1024,
        "GB" => 1024 * 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(unit)
}

fn default_huge_page_size() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("Hugepagesize:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Mark the pages holding `regions` (start address, length) as not dumped and
/// lock them in memory; report what the OS refused.
fn protect(regions: &[(usize, usize)]) {
    let page = shared_memory_page_size();
    let mut ranges: Vec<(usize, usize)> = regions
        .iter()
        .filter(|&&(start, len)| start != 0 && len > 0)
        .map(|&(start, len)| (start / page * page, (start + len).div_ceil(page) * page))
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::new();
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    let total: usize = merged.iter().map(|(s, e)| e - s).sum();
    let mut dump_error = None;
    let mut lock_error = None;
    // Huge pages are never swapped out; locking one would pin megabytes of
    // unrelated shared memory against RLIMIT_MEMLOCK.
    let lock = !huge_pages();
    for &(start, end) in &merged {
        // SAFETY: [start, end) lies inside the shared memory mapping (the
        // regions are in it, and the mapping starts and ends on page
        // boundaries of this size); neither call changes its contents.
        unsafe {
            if libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTDUMP) != 0 {
                dump_error.get_or_insert_with(std::io::Error::last_os_error);
            }
            if lock && libc::mlock(start as *const libc::c_void, end - start) != 0 {
                lock_error.get_or_insert_with(std::io::Error::last_os_error);
            }
        }
    }
    let log = |message: String, hint: &str| {
        ErrorReport::new(PgSqlErrorCode::ERRCODE_SYSTEM_ERROR, message, "pg_tde")
            .set_hint(hint)
            .report(PgLogLevel::LOG);
    };
    if let Some(e) = &dump_error {
        log(
            format!("pg_tde could not exclude its shared key caches from core dumps: {e}"),
            "Core dumps of this server may contain key material: disable them, or keep them as safe as the keys.",
        );
    }
    if let Some(e) = &lock_error {
        log(
            format!("pg_tde could not lock its shared key caches ({total} bytes) in memory: {e}"),
            "Key material may be written to swap. Raise the server's RLIMIT_MEMLOCK (ulimit -l, or LimitMEMLOCK= \
             in its systemd unit), or use encrypted swap.",
        );
    }
    if dump_error.is_none() && lock_error.is_none() {
        debug1!("pg_tde: {total} bytes of shared key caches excluded from core dumps and locked in memory");
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    #[pgrx::pg_test]
    fn memory_settings_parse() {
        use super::parse_kb_setting;
        assert_eq!(parse_kb_setting("2MB"), Some(2 << 20));
        assert_eq!(parse_kb_setting("1GB"), Some(1 << 30));
        assert_eq!(parse_kb_setting("0"), Some(0));
        assert_eq!(parse_kb_setting("64kB"), Some(64 << 10));
        assert_eq!(parse_kb_setting("lots"), None);
    }
}
