fn main() {
    std::process::exit(sigil_cli::main());
}
