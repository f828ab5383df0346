//! Token ids equal Python `tokenizers`' for the fixture strings.

mod common;

use hone::data::Tokenizer;
use hone::io::Dir;

#[test]
fn ids_match_python_tokenizers() {
    let tok = Tokenizer::open(&Dir(common::fixtures().join("llama"))).unwrap();
    let cases = std::fs::read(common::fixtures().join("tokenizer_cases.json")).unwrap();
    let checked = hone::parity::check_token_ids(&tok, &cases).unwrap();
    assert!(checked >= 5);
}
