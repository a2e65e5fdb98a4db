fn main() -> anyhow::Result<()> {
    sigil_operator::app::main()
}
