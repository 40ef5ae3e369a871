//! The OpenChat tokenizer fixture against OpenChat's published token ids.

use expanse::tokenizer::Tokenizer;

use crate::common::*;

#[test]
fn reproduces_openchat_published_ids() {
    let tok = Tokenizer::from_file(&fixtures().join("openchat-tokenizer/tokenizer.json")).unwrap();
    // From OpenChat's README (openchat/openchat-3.5-0106).
    let ids = tok.encode("GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant:", true).unwrap();
    assert_eq!(ids, vec![1, 420, 6316, 28781, 3198, 3123, 1247, 28747, 22557, 32000, 420, 6316, 28781, 3198, 3123, 21631, 28747]);
    assert_eq!(tok.token_id("<|end_of_turn|>"), Some(32000));
}
