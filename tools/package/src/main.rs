//! `edge-package`: writes a Wasm OCI image layout per module of `dist/`, optionally pushes them
//! and writes the Istio `WasmPlugin` manifests that point at the pushed digests.
//!
//! ```text
//! edge-package --dist DIR --out DIR --version V --revision R --created TIME
//!              [--push REGISTRY/REPO [--insecure] --istio TEMPLATES_DIR]
//! ```
//!
//! `./build.sh package` runs it with the workspace version, the commit and the commit's time.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use edge_package::{push, render_wasm_plugin, write_layouts, Meta, Registry};

const USAGE: &str = "usage: edge-package --dist DIR --out DIR --version V --revision R --created TIME [--push REGISTRY/REPO [--insecure] [--istio TEMPLATES_DIR]]";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-package: {e:#}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

#[derive(Default)]
struct Args {
    dist: Option<PathBuf>,
    out: Option<PathBuf>,
    version: Option<String>,
    revision: Option<String>,
    created: Option<String>,
    push: Option<String>,
    insecure: bool,
    istio: Option<PathBuf>,
}

fn parse() -> Result<Args> {
    let mut a = Args::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--dist" => a.dist = Some(value()?.into()),
            "--out" => a.out = Some(value()?.into()),
            "--version" => a.version = Some(value()?),
            "--revision" => a.revision = Some(value()?),
            "--created" => a.created = Some(value()?),
            "--push" => a.push = Some(value()?),
            "--istio" => a.istio = Some(value()?.into()),
            "--insecure" => a.insecure = true,
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(a)
}

fn run() -> Result<()> {
    let a = parse()?;
    let meta = Meta {
        version: a.version.context("--version is required")?,
        revision: a.revision.context("--revision is required")?,
        created: a.created.context("--created is required")?,
    };
    let out = a.out.context("--out is required")?;
    let images = write_layouts(&a.dist.context("--dist is required")?, &out, &meta)?;
    for image in &images {
        println!(
            "{:<16} {}  (module sha256 {})  {}",
            image.module,
            image.manifest_digest,
            image.module_sha256,
            image.layout.display()
        );
    }
    let Some(target) = a.push else {
        return Ok(());
    };
    let registry = Registry::from_env(&target, a.insecure);
    let istio_out = out.join("istio");
    for image in &images {
        let digest = push(image, &registry, &[&meta.version, "latest"])?;
        println!(
            "pushed {}:{{{},latest}}@{digest}",
            registry.repository(&image.module),
            meta.version
        );
        let Some(templates) = &a.istio else { continue };
        let template = templates.join(format!("{}.yaml", image.module));
        if !template.exists() {
            println!("  no {} to fill in", template.display());
            continue;
        }
        let text = std::fs::read_to_string(&template)?;
        std::fs::create_dir_all(&istio_out)?;
        let manifest = istio_out.join(format!("{}.yaml", image.module));
        std::fs::write(
            &manifest,
            render_wasm_plugin(&text, &registry.target, &meta.version, image.manifest_hex()),
        )?;
        println!("  {}", manifest.display());
    }
    Ok(())
}
