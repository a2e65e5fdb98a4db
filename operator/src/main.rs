// mimalloc, not glibc's malloc: the index's many small objects (bench/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    sigil_operator::app::main()
}
