fn main() -> anyhow::Result<()> {
    sigil_agent::app::main()
}
