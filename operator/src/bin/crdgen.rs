//! Writes every CRD as YAML into the directory given as the only argument (`make crds`).
fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: sigil-crdgen <dir>"))?;
    std::fs::create_dir_all(&dir)?;
    for (file, yaml) in sigil_operator::crd::render_all()? {
        std::fs::write(std::path::Path::new(&dir).join(file), yaml)?;
    }
    Ok(())
}
