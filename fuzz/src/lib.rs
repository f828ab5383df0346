//! What the fuzz targets share.

/// hone catches panics raised inside the tokenizers crate (`hone::data::Tokenizer` turns them
/// into errors naming the file) and the parquet crate (`hone::data::table`): those are not
/// crashes here; every other panic still aborts, as libFuzzer's hook does.
pub fn tolerate_caught_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let abort = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.location().is_some_and(|l| l.file().contains("/tokenizers-") || l.file().contains("/parquet-")) {
                abort(info);
            }
        }));
    });
}
