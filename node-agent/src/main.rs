fn main() {
    eprintln!("sigil-agent: not wired yet");
}
