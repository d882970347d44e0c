//! The only source of randomness of the crate: the operating system's CSPRNG
//! (`getrandom(2)` on Linux), through the `getrandom` crate.

use crate::error::{Result, TdeError};

/// Fill `buf` with random bytes from the OS CSPRNG.
pub(crate) fn fill(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| {
        let source = match e.raw_os_error() {
            Some(code) => std::io::Error::from_raw_os_error(code),
            None => std::io::Error::other(e.to_string()),
        };
        TdeError::io("reading the operating system's random number generator", source)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn fill_produces_distinct_nonzero_output() {
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        super::fill(&mut a).expect("getrandom");
        super::fill(&mut b).expect("getrandom");
        assert_ne!(a, [0u8; 32]);
        assert_ne!(a, b);
    }
}
