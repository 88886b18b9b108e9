//! The `keyward` binary: a thin CLI over the library.

#![forbid(unsafe_code)]

mod cli;

/// mimalloc instead of glibc's malloc: a signing request allocates and
/// frees small objects on several threads (the HTTP stack, the pool's
/// hand-over, the signature log), and glibc's arenas spent about 6% of the
/// CPU of an `http` benchmark run there. Measured with `keyward bench sign`
/// in alternating runs: 3-4% less CPU per HTTP signature.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    // Every file and directory keyward creates (databases, tokens, keys,
    // the embedded token's files, through SoftHSM2's own tools too) is its
    // owner's alone, whatever umask keyward was started with.
    keyward::runtime::files::private_umask();
    cli::run()
}
