//! The block-hash diff codec: decode(encode(x)) == x for arbitrary conversations and byte strings,
//! alone and against a store that already holds other conversations' blocks.
#![allow(clippy::unwrap_used)]

use batchagent::conversation::{Message, Role, ToolCall};
use batchagent::diff::{decode, encode, MemoryBlockStore, CHUNK_MAX};
use proptest::prelude::*;

/// Text heavy in JSON's special characters, repeats (which give equal blocks) and arbitrary Unicode.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[\"\\\\{}\n a-z]{0,40}", ("[a-z ]{1,16}", 1usize..200).prop_map(|(s, n)| s.repeat(n)),]
}

fn message() -> impl Strategy<Value = Message> {
    let call = (text(), "[a-z_]{1,12}", text()).prop_map(|(id, name, arguments)| ToolCall { id, name, arguments });
    prop_oneof![
        text().prop_map(Message::system),
        text().prop_map(Message::user),
        (text(), prop::collection::vec(call, 0..3)).prop_map(|(content, calls)| Message::assistant(content, calls)),
        (text(), text(), "[a-z_]{1,12}").prop_map(|(content, id, name)| Message {
            role: Role::Tool,
            content,
            tool_calls: Vec::new(),
            tool_call_id: Some(id),
            name: Some(name),
        }),
    ]
}

fn conversation() -> impl Strategy<Value = Vec<Message>> {
    prop::collection::vec(message(), 0..12)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn conversations_round_trip(conversations in prop::collection::vec(conversation(), 1..6), prefix in conversation()) {
        // Every conversation starts with the same messages, so later ones meet known blocks.
        let mut store = MemoryBlockStore::default();
        let mut encoded = Vec::new();
        for messages in &conversations {
            let mut all = prefix.clone();
            all.extend(messages.iter().cloned());
            let json = serde_json::to_vec(&all).unwrap();
            let e = encode(&json, &store);
            store.put_all(&e.new_blocks);
            encoded.push((json, e.manifest));
        }
        for (json, manifest) in &encoded {
            let back = decode(manifest, &store).unwrap();
            prop_assert_eq!(&back, json);
            let messages: Vec<Message> = serde_json::from_slice(&back).unwrap();
            prop_assert_eq!(serde_json::to_vec(&messages).unwrap(), back);
        }
    }

    #[test]
    fn turn_by_turn_checkpoints_round_trip(messages in conversation()) {
        let mut store = MemoryBlockStore::default();
        for turn in 0..=messages.len() {
            let json = serde_json::to_vec(&messages[..turn]).unwrap();
            let e = encode(&json, &store);
            store.put_all(&e.new_blocks);
            prop_assert_eq!(decode(&e.manifest, &store).unwrap(), json);
        }
    }

    #[test]
    fn bytes_round_trip(data in prop::collection::vec(any::<u8>(), 0..4 * CHUNK_MAX * 16), cut in any::<prop::sample::Index>()) {
        let mut store = MemoryBlockStore::default();
        let first = encode(&data, &store);
        store.put_all(&first.new_blocks);
        prop_assert_eq!(decode(&first.manifest, &store).unwrap(), data.clone());
        // A second string sharing a prefix needs nothing new for blocks wholly inside the prefix.
        let mut other = data[..cut.index(data.len() + 1)].to_vec();
        other.extend_from_slice(b"a different ending");
        let second = encode(&other, &store);
        store.put_all(&second.new_blocks);
        prop_assert_eq!(decode(&second.manifest, &store).unwrap(), other);
        prop_assert_eq!(encode(&data, &store).new_blocks.len(), 0);
    }
}
