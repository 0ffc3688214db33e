//! `sensorflow token FILE NAME`: creates an API bearer token, prints it once on stdout (only
//! the token), and stores only its SHA-256 as `NAME:sha256-hex` in FILE (replacing an older
//! token of that name). The file is replaced atomically with mode 0600.

use std::path::PathBuf;

use clap::Args;
use rand::RngCore;
use sensorflow_api::ApiTokens;
use sensorflow_api::auth::validate_token_name;

use super::passwd::write_private_file;

#[derive(Args, Debug)]
pub(crate) struct TokenArgs {
    /// The tokens file (created if missing); set it as `auth.api_tokens_file`.
    pub(crate) file: PathBuf,
    /// A name for the token (who or what uses it); an existing token of this name is replaced.
    pub(crate) name: String,
}

pub(crate) async fn run(args: TokenArgs) -> anyhow::Result<()> {
    validate_token_name(&args.name).map_err(|r| anyhow::anyhow!("invalid token name: {r}"))?;
    let mut tokens = if args.file.exists() {
        ApiTokens::load(&args.file)?
    } else {
        ApiTokens::default()
    };
    // 256 random bits, hex: valid in a header and in a WebSocket subprotocol name.
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let added = tokens.set(&args.name, ApiTokens::digest(&token));
    write_private_file(&args.file, &tokens.to_text())?;
    eprintln!(
        "{} token {} in {} (shown once; only its SHA-256 is stored)",
        if added { "added" } else { "replaced" },
        args.name,
        args.file.display()
    );
    println!("{token}");
    Ok(())
}
