//! `sensorflow passwd FILE USER`: adds a device user to the MQTT password file, or changes its
//! password. The password is read from stdin (its first line), hashed with argon2id and
//! stored as `USER:PHC-hash`; the file is replaced atomically and readable by its owner only.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use rand::RngCore;
use sensorflow_ingest::PasswordFile;
use sensorflow_ingest::auth::{hash_password, validate_username};

#[derive(Args, Debug)]
pub(crate) struct PasswdArgs {
    /// The password file (created if missing); set it as `auth.password_file`.
    pub(crate) file: PathBuf,
    /// The username, which is also the sensor id the device may publish as.
    pub(crate) user: String,
}

pub(crate) async fn run(args: PasswdArgs) -> anyhow::Result<()> {
    validate_username(&args.user).map_err(|r| anyhow::anyhow!("invalid username: {r}"))?;
    let password = read_password()?;
    let mut file = if args.file.exists() {
        PasswordFile::load(&args.file)?
    } else {
        PasswordFile::default()
    };
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let phc = tokio::task::spawn_blocking(move || hash_password(password.as_bytes(), &salt))
        .await
        .context("hashing the password")??;
    let added = file.set(&args.user, phc);
    write_private_file(&args.file, &file.to_text())?;
    eprintln!(
        "{} user {} in {}",
        if added { "added" } else { "updated" },
        args.user,
        args.file.display()
    );
    Ok(())
}

/// The first line of stdin, without its line ending; an empty password is refused.
fn read_password() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from stdin")?;
    let password = line.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        bail!(
            "no password on stdin (e.g. `printf '%s\\n' \"$PASSWORD\" | sensorflow passwd FILE USER`)"
        );
    }
    Ok(password.to_owned())
}

/// Replaces `path` with `text` atomically: a temporary file in the same directory, created with
/// mode 0600, written and fsynced, then renamed over `path` (and the directory fsynced). A
/// reader sees the old file or the new one, never a part.
pub(crate) fn write_private_file(path: &Path, text: &str) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let result = (|| {
        let mut f = options
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        anyhow::Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn private_file_is_replaced_whole_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        write_private_file(&path, "a\n").unwrap();
        write_private_file(&path, "b\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "b\n");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
    }
}
