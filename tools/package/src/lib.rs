//! Wasm OCI images of the edge modules, in the *oci* variant of the Wasm image specification
//! that Istio's `WasmPlugin` and Envoy Gateway's `EnvoyExtensionPolicy` pull: an OCI image
//! manifest whose config has the media type `application/vnd.module.wasm.config.v1+json` and
//! whose layers are that runtime config and the module itself
//! (`application/vnd.module.wasm.content.layer.v1+wasm`, the raw bytes).
//!
//! Two layers, not one: Istio's fetcher (`pkg/wasm/imagefetcher.go`, the OCI-artifact branch)
//! refuses an image of this variant unless it has exactly two layers, one of them the Wasm
//! layer. An image with the Wasm layer alone would be pulled by some tools and refused by Istio.
//!
//! Images are reproducible: every input (module bytes, version, revision, creation time) is
//! given, and JSON is written with sorted keys, so the same commit gives the same digests.
//! Pushing is left to skopeo, which copies an OCI layout to a registry without rewriting it,
//! so the digest in the registry is the one computed here.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use oci_spec::image::{
    Descriptor, DescriptorBuilder, Digest, ImageIndexBuilder, ImageManifest, ImageManifestBuilder,
    MediaType, OciLayoutBuilder,
};
use serde_json::Value;

/// The Wasm layer: the module's bytes, uncompressed.
pub const WASM_LAYER_MEDIA_TYPE: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
/// The image config and the runtime-config layer.
pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.module.wasm.config.v1+json";
/// The manifest annotation carrying the module's own sha256 (hex), so a user can match an
/// image to a `dist/` file without pulling it.
pub const MODULE_SHA256_ANNOTATION: &str = "edge-bundle.module.sha256";

/// What every image of one build carries besides its module.
#[derive(Clone, Debug)]
pub struct Meta {
    /// The release version, tagged and annotated (`org.opencontainers.image.version`).
    pub version: String,
    /// The source revision (a git commit), annotated (`org.opencontainers.image.revision`).
    pub revision: String,
    /// RFC 3339 time annotated as `org.opencontainers.image.created`: the commit's time, not
    /// the build's, so that rebuilding a commit gives the same digest.
    pub created: String,
}

/// An image written as an OCI layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// The module's name in `dist/` (`rate_limit`), also the repository's last segment.
    pub module: String,
    /// The layout's directory (`dist/oci/rate_limit`).
    pub layout: PathBuf,
    /// `sha256:<hex>` of the manifest: what a registry serves the image by, and the hex part is
    /// what Istio's `WasmPlugin.sha256` checks.
    pub manifest_digest: String,
    /// Hex sha256 of the module's bytes.
    pub module_sha256: String,
}

impl Image {
    /// The hex part of the manifest digest (`WasmPlugin.sha256`).
    pub fn manifest_hex(&self) -> &str {
        self.manifest_digest
            .strip_prefix("sha256:")
            .unwrap_or(&self.manifest_digest)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    let mut hasher = edge_core::sha256::Sha256::new();
    hasher.update(bytes);
    hex(&hasher.finish())
}

/// JSON with every object's keys sorted: the spec types hold annotations in a `HashMap`, whose
/// order changes from run to run, and a digest must not.
fn canonical_json(value: &impl serde::Serialize) -> Result<Vec<u8>> {
    fn sorted(v: Value) -> Value {
        match v {
            Value::Object(map) => {
                let entries: BTreeMap<String, Value> =
                    map.into_iter().map(|(k, v)| (k, sorted(v))).collect();
                Value::Object(entries.into_iter().collect())
            }
            Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
            other => other,
        }
    }
    Ok(serde_json::to_vec(&sorted(serde_json::to_value(value)?))?)
}

/// Writes `bytes` as a blob of the layout and describes it.
fn put_blob(layout: &Path, media_type: &str, bytes: &[u8]) -> Result<Descriptor> {
    let hex = sha256_hex(bytes);
    let dir = layout.join("blobs").join("sha256");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::write(dir.join(&hex), bytes).with_context(|| format!("writing blob {hex}"))?;
    let digest: Digest = format!("sha256:{hex}").parse()?;
    Ok(Descriptor::new(
        MediaType::from(media_type),
        bytes.len() as u64,
        digest,
    ))
}

fn annotated(d: Descriptor, pairs: &[(&str, &str)]) -> Result<Descriptor> {
    let annotations: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Ok(DescriptorBuilder::default()
        .media_type(d.media_type().clone())
        .digest(d.digest().clone())
        .size(d.size())
        .annotations(annotations)
        .build()?)
}

/// The runtime config of the Wasm image specification: which runtime the module is for, the
/// ABI it exports and its root id (our modules use their name as root id).
fn runtime_config(module: &str) -> Value {
    serde_json::json!({
        "type": "envoy_proxy",
        "abiVersions": ["proxy_abi_version_0_2_1"],
        "config": { "rootIds": [module] },
    })
}

/// Writes the image of one module as an OCI layout in `layout` (replacing what was there) and
/// returns it. The index tags the manifest with `meta.version`.
pub fn write_layout(module_file: &Path, layout: &Path, meta: &Meta) -> Result<Image> {
    let module = module_file
        .file_stem()
        .and_then(|s| s.to_str())
        .with_context(|| format!("{}: not a module file name", module_file.display()))?
        .to_string();
    let bytes =
        fs::read(module_file).with_context(|| format!("reading {}", module_file.display()))?;
    ensure!(
        bytes.starts_with(b"\0asm"),
        "{}: not a wasm module",
        module_file.display()
    );
    if layout.exists() {
        fs::remove_dir_all(layout).with_context(|| format!("clearing {}", layout.display()))?;
    }
    fs::create_dir_all(layout)?;

    let config_bytes = canonical_json(&runtime_config(&module))?;
    let config = put_blob(layout, WASM_CONFIG_MEDIA_TYPE, &config_bytes)?;
    let config_layer = annotated(
        config.clone(),
        &[("org.opencontainers.image.title", "runtime-config.json")],
    )?;
    let wasm = annotated(
        put_blob(layout, WASM_LAYER_MEDIA_TYPE, &bytes)?,
        &[("org.opencontainers.image.title", "plugin.wasm")],
    )?;
    let module_sha256 = sha256_hex(&bytes);
    let annotations: HashMap<String, String> = [
        ("org.opencontainers.image.title", module.as_str()),
        ("org.opencontainers.image.version", meta.version.as_str()),
        ("org.opencontainers.image.revision", meta.revision.as_str()),
        ("org.opencontainers.image.created", meta.created.as_str()),
        ("org.opencontainers.image.licenses", "Apache-2.0"),
        (MODULE_SHA256_ANNOTATION, module_sha256.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config)
        .layers(vec![config_layer, wasm])
        .annotations(annotations)
        .build()?;
    let manifest_bytes = canonical_json(&manifest)?;
    let manifest_desc = annotated(
        put_blob(
            layout,
            "application/vnd.oci.image.manifest.v1+json",
            &manifest_bytes,
        )?,
        &[("org.opencontainers.image.ref.name", meta.version.as_str())],
    )?;
    let manifest_digest = manifest_desc.digest().to_string();

    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![manifest_desc])
        .build()?;
    fs::write(layout.join("index.json"), canonical_json(&index)?)?;
    let oci_layout = OciLayoutBuilder::default()
        .image_layout_version("1.0.0")
        .build()?;
    fs::write(layout.join("oci-layout"), canonical_json(&oci_layout)?)?;

    Ok(Image {
        module,
        layout: layout.to_path_buf(),
        manifest_digest,
        module_sha256,
    })
}

/// The modules of `dist`, by name.
pub fn modules(dist: &Path) -> Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = fs::read_dir(dist)
        .with_context(|| format!("reading {} (run ./build.sh first)", dist.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
        .collect();
    found.sort();
    ensure!(
        !found.is_empty(),
        "no modules in {} (run ./build.sh first)",
        dist.display()
    );
    Ok(found)
}

/// Writes one layout per module of `dist` under `out/<module>/`.
pub fn write_layouts(dist: &Path, out: &Path, meta: &Meta) -> Result<Vec<Image>> {
    modules(dist)?
        .iter()
        .map(|m| {
            let name = m.file_stem().unwrap_or_default();
            write_layout(m, &out.join(name), meta)
        })
        .collect()
}

/// The manifest a layout's index points at, read back (what a registry will serve).
pub fn read_manifest(layout: &Path) -> Result<(String, ImageManifest)> {
    let index: Value = serde_json::from_slice(&fs::read(layout.join("index.json"))?)?;
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .context("index.json has no manifest")?
        .to_string();
    let hex = digest.strip_prefix("sha256:").unwrap_or(&digest);
    let manifest = ImageManifest::from_file(layout.join("blobs").join("sha256").join(hex))?;
    Ok((digest, manifest))
}

/// How to reach a registry.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    /// `HOST[:PORT]/REPO`: each module goes to `HOST[:PORT]/REPO/<module>`.
    pub target: String,
    /// Plain HTTP or an unverified certificate (a registry on loopback in tests).
    pub insecure: bool,
    /// `(username, password)`, written to a private auth file for skopeo, never to its
    /// command line.
    pub credentials: Option<(String, String)>,
}

impl Registry {
    /// Credentials from `EDGE_REGISTRY_USERNAME` and `EDGE_REGISTRY_PASSWORD` when both are
    /// set; otherwise skopeo's own (`REGISTRY_AUTH_FILE`, `~/.docker/config.json`, ...).
    pub fn from_env(target: &str, insecure: bool) -> Registry {
        let user = std::env::var("EDGE_REGISTRY_USERNAME").ok();
        let password = std::env::var("EDGE_REGISTRY_PASSWORD").ok();
        Registry {
            target: target.trim_end_matches('/').to_string(),
            insecure,
            credentials: user.zip(password),
        }
    }

    /// `HOST[:PORT]/REPO/<module>`.
    pub fn repository(&self, module: &str) -> String {
        format!("{}/{module}", self.target)
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("running {cmd:?} (is skopeo installed?)"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// skopeo's auth file format: `{"auths": {HOST: {"auth": base64(user:password)}}}`.
fn auth_file(dir: &Path, registry: &str, user: &str, password: &str) -> Result<PathBuf> {
    use base64::Engine as _;
    let host = registry.split('/').next().unwrap_or(registry);
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let body = serde_json::json!({ "auths": { host: { "auth": token } } });
    let path = dir.join("auth.json");
    let mut file = fs::OpenOptions::new();
    file.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
    file.open(&path)?.write_all(body.to_string().as_bytes())?;
    Ok(path)
}

/// Pushes an image under each tag and returns the digest the registry stored, which is the
/// layout's (skopeo copies the manifest unchanged; a difference is an error).
pub fn push(image: &Image, registry: &Registry, tags: &[&str]) -> Result<String> {
    let work = tempfile::tempdir()?;
    let auth = match &registry.credentials {
        Some((user, password)) => Some(auth_file(work.path(), &registry.target, user, password)?),
        None => None,
    };
    let source = format!(
        "oci:{}:{}",
        image.layout.display(),
        read_ref_name(&image.layout)?
    );
    for tag in tags {
        let digest_file = work.path().join("digest");
        let mut cmd = Command::new("skopeo");
        cmd.arg("copy").arg("--quiet");
        if registry.insecure {
            cmd.arg("--dest-tls-verify=false");
        }
        if let Some(auth) = &auth {
            cmd.arg("--dest-authfile").arg(auth);
        }
        cmd.arg("--digestfile")
            .arg(&digest_file)
            .arg(&source)
            .arg(format!(
                "docker://{}:{tag}",
                registry.repository(&image.module)
            ));
        run(&mut cmd)?;
        let pushed = fs::read_to_string(&digest_file)?.trim().to_string();
        ensure!(
            pushed == image.manifest_digest,
            "{}:{tag}: the registry stored {pushed}, the layout has {}",
            image.module,
            image.manifest_digest
        );
    }
    Ok(image.manifest_digest.clone())
}

fn read_ref_name(layout: &Path) -> Result<String> {
    let index: Value = serde_json::from_slice(&fs::read(layout.join("index.json"))?)?;
    index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .map(str::to_string)
        .context("index.json names no tag")
}

/// Fills an `envoy/istio/<module>.yaml` template: `oci://REGISTRY/REPO/<module>:VERSION` and
/// `SHA256` are replaced by the pushed image's address and manifest digest.
pub fn render_wasm_plugin(template: &str, registry: &str, version: &str, sha256: &str) -> String {
    template
        .replace("REGISTRY/REPO", registry.trim_end_matches('/'))
        .replace(":VERSION", &format!(":{version}"))
        .replace("SHA256", sha256)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            version: "1.2.3".into(),
            revision: "abc".into(),
            created: "2026-01-01T00:00:00Z".into(),
        }
    }

    fn module(dir: &Path, name: &str, body: &[u8]) -> PathBuf {
        let path = dir.join(format!("{name}.wasm"));
        let mut bytes = b"\0asm\x01\0\0\0".to_vec();
        bytes.extend_from_slice(body);
        fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn same_inputs_give_the_same_digest_and_any_change_another() {
        let dir = tempfile::tempdir().unwrap();
        let m = module(dir.path(), "rate_limit", b"");
        let a = write_layout(&m, &dir.path().join("a"), &meta()).unwrap();
        let b = write_layout(&m, &dir.path().join("b"), &meta()).unwrap();
        assert_eq!(a.manifest_digest, b.manifest_digest);
        let other = Meta {
            revision: "abd".into(),
            ..meta()
        };
        let c = write_layout(&m, &dir.path().join("c"), &other).unwrap();
        assert_ne!(a.manifest_digest, c.manifest_digest);
        let m2 = module(dir.path(), "rate_limit", b"\0");
        let d = write_layout(&m2, &dir.path().join("d"), &meta()).unwrap();
        assert_ne!(a.manifest_digest, d.manifest_digest);
    }

    #[test]
    fn the_manifest_has_the_layers_istio_reads() {
        let dir = tempfile::tempdir().unwrap();
        let m = module(dir.path(), "idempotency", b"xyz");
        let image = write_layout(&m, &dir.path().join("l"), &meta()).unwrap();
        let (digest, manifest) = read_manifest(&image.layout).unwrap();
        assert_eq!(digest, image.manifest_digest);
        assert_eq!(
            manifest.config().media_type().as_ref(),
            WASM_CONFIG_MEDIA_TYPE
        );
        let types: Vec<&str> = manifest
            .layers()
            .iter()
            .map(|l| l.media_type().as_ref())
            .collect();
        assert_eq!(types, [WASM_CONFIG_MEDIA_TYPE, WASM_LAYER_MEDIA_TYPE]);
        let wasm = &manifest.layers()[1];
        let blob = fs::read(
            image
                .layout
                .join("blobs/sha256")
                .join(wasm.digest().digest()),
        )
        .unwrap();
        assert_eq!(blob, fs::read(&m).unwrap());
        let notes = manifest.annotations().as_ref().unwrap();
        assert_eq!(notes["org.opencontainers.image.version"], "1.2.3");
        assert_eq!(notes["org.opencontainers.image.revision"], "abc");
        assert_eq!(notes[MODULE_SHA256_ANNOTATION], image.module_sha256);
        assert_eq!(read_ref_name(&image.layout).unwrap(), "1.2.3");
    }

    #[test]
    fn a_file_that_is_not_wasm_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.wasm");
        fs::write(&path, b"text").unwrap();
        let err = write_layout(&path, &dir.path().join("l"), &meta()).unwrap_err();
        assert!(err.to_string().contains("not a wasm module"), "{err}");
    }

    #[test]
    fn templates_get_the_image_and_digest() {
        let t = "url: oci://REGISTRY/REPO/rate_limit:VERSION\nsha256: SHA256\n";
        assert_eq!(
            render_wasm_plugin(t, "reg.local:5000/edge/", "0.1.0", "ab12"),
            "url: oci://reg.local:5000/edge/rate_limit:0.1.0\nsha256: ab12\n"
        );
    }

    #[test]
    fn credentials_go_to_a_private_auth_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = auth_file(dir.path(), "reg.local:5000/edge", "u", "p").unwrap();
        let body: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(body["auths"]["reg.local:5000"]["auth"], "dTpw");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
