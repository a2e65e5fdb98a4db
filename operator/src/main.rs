fn main() {
    eprintln!("sigil-operator: not wired yet");
}
