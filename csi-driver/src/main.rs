fn main() {
    eprintln!("sigil-csi: not wired yet");
}
