//! Symbolic names ("c1", "w1") and the UUIDs derived from them.

use std::collections::HashMap;

use uuid::Uuid;

/// The kinds of symbolic name; each has its own UUID space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Kind {
    Chat,
    Worker,
    Runner,
    User,
    Config,
}

impl Kind {
    fn tag(self) -> &'static str {
        match self {
            Kind::Chat => "chat",
            Kind::Worker => "worker",
            Kind::Runner => "runner",
            Kind::User => "user",
            Kind::Config => "config",
        }
    }
}

/// Symbolic names and their UUIDs, both ways.
#[derive(Clone, Debug, Default)]
pub(crate) struct Names {
    /// Mixed into chat ids only (see [`Names::with_chat_namespace`]).
    chat_namespace: String,
    forward: HashMap<(Kind, String), Uuid>,
    back: HashMap<Uuid, String>,
}

impl Names {
    /// Names whose chat ids also depend on `namespace` (empty: on the name
    /// alone). Replays on a long-lived database use a fresh namespace per
    /// run, so a second run does not collide with the chats of the first.
    pub(crate) fn with_chat_namespace(namespace: &str) -> Self {
        Names {
            chat_namespace: namespace.to_owned(),
            ..Names::default()
        }
    }

    /// The UUID of a name: the name itself if it is a UUID, else derived
    /// from the kind and the name.
    pub(crate) fn id(&mut self, kind: Kind, name: &str) -> Uuid {
        if let Some(id) = self.forward.get(&(kind, name.to_owned())) {
            return *id;
        }
        let id = Uuid::parse_str(name).unwrap_or_else(|_| {
            let ns = if kind == Kind::Chat {
                self.chat_namespace.as_str()
            } else {
                ""
            };
            derived_uuid(&format!("chatstate-trace/{ns}/{}/{name}", kind.tag()))
        });
        self.forward.insert((kind, name.to_owned()), id);
        self.back.insert(id, name.to_owned());
        id
    }

    /// The name of a UUID handed out here, else the UUID as text.
    pub(crate) fn name(&self, id: Uuid) -> String {
        self.back
            .get(&id)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    }
}

/// A UUID (version 8, "custom") from FNV-1a over `text`: stable across
/// platforms and releases, which `std`'s hasher does not promise.
fn derived_uuid(text: &str) -> Uuid {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    let mut h = OFFSET;
    for b in text.bytes() {
        h ^= u128::from(b);
        h = h.wrapping_mul(PRIME);
    }
    let mut bytes = h.to_be_bytes();
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    Uuid::from_bytes(bytes)
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_distinct_per_kind() {
        let mut a = Names::default();
        let mut b = Names::default();
        let c1 = a.id(Kind::Chat, "c1");
        assert_eq!(c1, b.id(Kind::Chat, "c1"));
        assert_ne!(c1, a.id(Kind::Runner, "c1"));
        assert_eq!(a.name(c1), "c1");
        assert_eq!(c1.get_version_num(), 8);
        // Pinned: a change here changes every trace's payloads.
        assert_eq!(c1.to_string(), "253c4f06-531a-8c4f-83f0-ca01b14ac061");
        let mut ns = Names::with_chat_namespace("run-2");
        assert_ne!(ns.id(Kind::Chat, "c1"), c1);
        assert_eq!(ns.id(Kind::Runner, "r1"), a.id(Kind::Runner, "r1"));
    }
}
