fn main() -> anyhow::Result<()> {
    sigil_csi::app::main()
}
