//! Progress of `ctr-remote`'s long steps (a layer downloaded by rpull, a layer converted): a
//! bar on stderr when it is a terminal, nothing otherwise — the per-layer lines the commands
//! print when a step ends are the plain record, on a terminal or in a CI log alike.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressFinish, ProgressStyle};

/// A byte bar for one step of `total` bytes, labelled `what`; hidden unless stderr is a
/// terminal. Clear it (`finish_and_clear`) before printing the step's line; a bar dropped on
/// an error clears itself.
pub(crate) fn bytes(what: String, total: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
        .with_finish(ProgressFinish::AndClear);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what);
    bar
}
