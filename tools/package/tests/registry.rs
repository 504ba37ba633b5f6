//! Every module of `dist/` through a real registry (Debian's `docker-registry`, on a loopback
//! port the registry picks): pushed under its version and `latest`, pulled back by digest with
//! skopeo, and checked against what Istio reads: the media types, and a Wasm layer that is
//! byte-for-byte the module.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use edge_engines::Registry as TestRegistry;
use edge_package::{
    push, write_layouts, Meta, Registry, WASM_CONFIG_MEDIA_TYPE, WASM_LAYER_MEDIA_TYPE,
};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn skopeo(args: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new("skopeo")
        .args(args)
        .output()
        .context("running skopeo (Debian package skopeo; ./build.sh test installs it)")?;
    ensure!(
        out.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

fn sha256(bytes: &[u8]) -> String {
    let mut h = edge_core::sha256::Sha256::new();
    h.update(bytes);
    h.finish().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn every_module_is_pushed_and_pulled_back_by_digest_byte_for_byte() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let meta = Meta {
        version: "0.1.0".into(),
        revision: "0000000000000000000000000000000000000000".into(),
        created: "2026-01-01T00:00:00Z".into(),
    };
    let dist = root().join("dist");
    let images = write_layouts(&dist, &work.path().join("oci"), &meta)?;
    let names: Vec<&str> = images.iter().map(|i| i.module.as_str()).collect();
    for plugin in [
        "cached_fallback",
        "flag_router",
        "idempotency",
        "rate_limit",
    ] {
        ensure!(
            names.contains(&plugin),
            "dist/{plugin}.wasm was not packaged"
        );
    }
    let target = Registry {
        target: format!("127.0.0.1:{}/edge", registry.port()),
        insecure: true,
        credentials: None,
    };
    for image in &images {
        let digest = push(image, &target, &["0.1.0", "latest"])?;
        let repo = target.repository(&image.module);

        let pulled = work.path().join(format!("pulled-{}", image.module));
        let by_digest = format!("docker://{repo}@{digest}");
        let pulled_arg = format!("dir:{}", pulled.display());
        skopeo(&[
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            &by_digest,
            &pulled_arg,
        ])?;
        let manifest_bytes = std::fs::read(pulled.join("manifest.json"))?;
        assert_eq!(
            format!("sha256:{}", sha256(&manifest_bytes)),
            digest,
            "{}: the manifest served is the one pushed",
            image.module
        );
        let manifest: Value = serde_json::from_slice(&manifest_bytes)?;
        assert_eq!(
            manifest["mediaType"],
            "application/vnd.oci.image.manifest.v1+json"
        );
        assert_eq!(manifest["config"]["mediaType"], WASM_CONFIG_MEDIA_TYPE);
        let layers = manifest["layers"].as_array().context("layers")?;
        let types: Vec<&str> = layers
            .iter()
            .filter_map(|l| l["mediaType"].as_str())
            .collect();
        assert_eq!(types, [WASM_CONFIG_MEDIA_TYPE, WASM_LAYER_MEDIA_TYPE]);
        let wasm_digest = layers[1]["digest"].as_str().context("layer digest")?;
        let layer = std::fs::read(pulled.join(wasm_digest.trim_start_matches("sha256:")))?;
        let module = std::fs::read(dist.join(format!("{}.wasm", image.module)))?;
        assert!(
            layer == module,
            "{}: the pulled Wasm layer differs from dist/",
            image.module
        );
        assert_eq!(
            manifest["annotations"]["edge-bundle.module.sha256"],
            sha256(&module)
        );

        let latest = skopeo(&[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{repo}:latest"),
        ])?;
        assert_eq!(
            format!("sha256:{}", sha256(&latest)),
            digest,
            "{}: latest is the version's image",
            image.module
        );
    }
    Ok(())
}
