//! `install-library --from SRC --to DST`: copy the enforcement library onto the host
//! atomically, so a container starting meanwhile never preloads a half-written library.

use anyhow::{Context, Result};
use clap::Parser;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "install-library",
    about = "Install the enforcement library on the host, atomically"
)]
struct Args {
    /// The library inside the image.
    #[arg(
        long,
        env = "LIBRARY_FROM",
        default_value = "/usr/local/vgpu/libvgpu.so"
    )]
    from: PathBuf,
    /// Where the CDI specs mount it from (a host directory mounted into this container).
    #[arg(long, env = "LIBRARY_TO")]
    to: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let bytes =
        std::fs::read(&args.from).with_context(|| format!("reading {}", args.from.display()))?;
    let dir = args
        .to
        .parent()
        .context("--to must name a file in a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".libvgpu.")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(&bytes).context("writing the library")?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o755))
        .context("chmod 0755")?;
    tmp.as_file().sync_all().context("fsync")?;
    tmp.persist(&args.to)
        .with_context(|| format!("renaming into {}", args.to.display()))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync {}", dir.display()))?;
    println!(
        "installed {} ({} bytes) at {}",
        args.from.display(),
        bytes.len(),
        args.to.display()
    );
    Ok(())
}
