//! Inventory: apps, components, volumes.

use ferry_core::{
    App, Argv, Component, ComponentKind, ComponentState, ContainerComponent, ContainerMount, Hooks,
    HostComponent, Inventory, MountBackup, Timestamp, Volume,
};

use super::{ConvertError, parse};
use crate::v1 as pb;

impl From<ComponentState> for pb::ComponentState {
    fn from(s: ComponentState) -> Self {
        match s {
            ComponentState::Running => Self::Running,
            ComponentState::Stopped => Self::Stopped,
            ComponentState::Unknown => Self::Unknown,
        }
    }
}

impl From<pb::ComponentState> for ComponentState {
    fn from(s: pb::ComponentState) -> Self {
        match s {
            pb::ComponentState::Running => Self::Running,
            pb::ComponentState::Stopped => Self::Stopped,
            pb::ComponentState::Unspecified | pb::ComponentState::Unknown => Self::Unknown,
        }
    }
}

/// A state number from the wire; one this build does not know is unknown.
fn state_from_wire(value: i32) -> ComponentState {
    pb::ComponentState::try_from(value).map_or(ComponentState::Unknown, ComponentState::from)
}

fn argv_to_pb(a: Argv) -> pb::Argv {
    pb::Argv { args: a.into() }
}

fn argv_from_pb(a: Option<pb::Argv>, field: &str) -> Result<Argv, ConvertError> {
    let a = a.ok_or_else(|| ConvertError::Missing {
        field: field.to_owned(),
    })?;
    parse(|| field.to_owned(), a.args)
}

impl From<HostComponent> for pb::HostComponent {
    fn from(h: HostComponent) -> Self {
        use pb::host_component::Control;
        let control = match h {
            HostComponent::Systemd { unit } => {
                Control::Systemd(pb::SystemdUnit { unit: unit.into() })
            }
            HostComponent::Commands {
                start,
                stop,
                status,
            } => Control::Commands(pb::Commands {
                start: Some(argv_to_pb(start)),
                stop: Some(argv_to_pb(stop)),
                status: status.map(argv_to_pb),
            }),
        };
        Self {
            control: Some(control),
        }
    }
}

fn host_from_pb(h: pb::HostComponent, field: &str) -> Result<HostComponent, ConvertError> {
    use pb::host_component::Control;
    match h.control {
        Some(Control::Systemd(s)) => Ok(HostComponent::Systemd {
            unit: parse(|| format!("{field}.systemd.unit"), s.unit)?,
        }),
        Some(Control::Commands(c)) => Ok(HostComponent::Commands {
            start: argv_from_pb(c.start, &format!("{field}.commands.start"))?,
            stop: argv_from_pb(c.stop, &format!("{field}.commands.stop"))?,
            status: c
                .status
                .map(|s| argv_from_pb(Some(s), &format!("{field}.commands.status")))
                .transpose()?,
        }),
        None => Err(ConvertError::Missing {
            field: format!("{field}.control"),
        }),
    }
}

impl From<Component> for pb::Component {
    fn from(c: Component) -> Self {
        let kind = match c.kind {
            ComponentKind::Host(h) => pb::component::Kind::Host(h.into()),
            ComponentKind::Container(c) => pb::component::Kind::Container(pb::ContainerComponent {
                id: c.id,
                name: c.name,
                image: c.image,
                image_id: c.image_id,
                mounts: c.mounts.into_iter().map(mount_to_pb).collect(),
            }),
        };
        Self {
            name: c.name.into(),
            stateful: c.stateful,
            state: pb::ComponentState::from(c.state) as i32,
            volumes: c.volumes.into_iter().map(String::from).collect(),
            depends_on: c.depends_on.into_iter().map(String::from).collect(),
            kind: Some(kind),
            pre_backup: c.hooks.pre_backup.map(argv_to_pb),
            post_backup: c.hooks.post_backup.map(argv_to_pb),
            pre_stop: c.hooks.pre_stop.map(argv_to_pb),
        }
    }
}

fn mount_to_pb(m: ContainerMount) -> pb::ContainerMount {
    let (backup, why) = m.backup.code();
    pb::ContainerMount {
        backup: backup.to_owned(),
        why: why.to_owned(),
        destination: m.destination,
        source: m.source,
        kind: m.kind,
        read_only: m.read_only,
    }
}

fn mount_from_pb(m: pb::ContainerMount, field: &str) -> Result<ContainerMount, ConvertError> {
    let backup = MountBackup::from_code(&m.backup, m.why).ok_or_else(|| ConvertError::Unknown {
        field: format!("{field}.backup"),
        value: m.backup.clone(),
    })?;
    Ok(ContainerMount {
        destination: m.destination,
        source: m.source,
        kind: m.kind,
        read_only: m.read_only,
        backup,
    })
}

fn component_from_pb(c: pb::Component, field: &str) -> Result<Component, ConvertError> {
    let kind = match c.kind {
        Some(pb::component::Kind::Host(h)) => {
            ComponentKind::Host(host_from_pb(h, &format!("{field}.host"))?)
        }
        Some(pb::component::Kind::Container(c)) => {
            if c.id.is_empty() {
                return Err(ConvertError::Missing {
                    field: format!("{field}.container.id"),
                });
            }
            let mounts = c
                .mounts
                .into_iter()
                .enumerate()
                .map(|(i, m)| mount_from_pb(m, &format!("{field}.container.mounts[{i}]")))
                .collect::<Result<_, _>>()?;
            ComponentKind::Container(ContainerComponent {
                id: c.id,
                name: c.name,
                image: c.image,
                image_id: c.image_id,
                mounts,
            })
        }
        None => {
            return Err(ConvertError::Missing {
                field: format!("{field}.kind"),
            });
        }
    };
    Ok(Component {
        name: parse(|| format!("{field}.name"), c.name)?,
        kind,
        stateful: c.stateful,
        volumes: c
            .volumes
            .into_iter()
            .enumerate()
            .map(|(i, v)| parse(|| format!("{field}.volumes[{i}]"), v))
            .collect::<Result<_, _>>()?,
        depends_on: c
            .depends_on
            .into_iter()
            .enumerate()
            .map(|(i, d)| parse(|| format!("{field}.depends_on[{i}]"), d))
            .collect::<Result<_, _>>()?,
        state: state_from_wire(c.state),
        hooks: Hooks {
            pre_backup: c
                .pre_backup
                .map(|a| argv_from_pb(Some(a), &format!("{field}.pre_backup")))
                .transpose()?,
            post_backup: c
                .post_backup
                .map(|a| argv_from_pb(Some(a), &format!("{field}.post_backup")))
                .transpose()?,
            pre_stop: c
                .pre_stop
                .map(|a| argv_from_pb(Some(a), &format!("{field}.pre_stop")))
                .transpose()?,
        },
    })
}

impl From<Volume> for pb::Volume {
    fn from(v: Volume) -> Self {
        Self {
            name: v.name.into(),
            path: v.path.into(),
        }
    }
}

fn volume_from_pb(v: pb::Volume, field: &str) -> Result<Volume, ConvertError> {
    Ok(Volume {
        name: parse(|| format!("{field}.name"), v.name)?,
        path: parse(|| format!("{field}.path"), v.path)?,
    })
}

impl From<App> for pb::App {
    fn from(a: App) -> Self {
        Self {
            name: a.name.into(),
            team: a.team.into(),
            components: a.components.into_iter().map(Into::into).collect(),
            volumes: a.volumes.into_iter().map(Into::into).collect(),
        }
    }
}

/// Converts and checks one app; `field` names it in errors.
pub fn app_from_pb(a: pb::App, field: &str) -> Result<App, ConvertError> {
    let app = App {
        name: parse(|| format!("{field}.name"), a.name)?,
        team: parse(|| format!("{field}.team"), a.team)?,
        volumes: a
            .volumes
            .into_iter()
            .enumerate()
            .map(|(i, v)| volume_from_pb(v, &format!("{field}.volumes[{i}]")))
            .collect::<Result<_, _>>()?,
        components: a
            .components
            .into_iter()
            .enumerate()
            .map(|(i, c)| component_from_pb(c, &format!("{field}.components[{i}]")))
            .collect::<Result<_, _>>()?,
    };
    app.validate()
        .map_err(|source| ConvertError::Inconsistent {
            field: field.to_owned(),
            source: Box::new(source),
        })?;
    Ok(app)
}

impl TryFrom<pb::App> for App {
    type Error = ConvertError;
    fn try_from(a: pb::App) -> Result<Self, Self::Error> {
        app_from_pb(a, "app")
    }
}

impl From<Inventory> for pb::Inventory {
    fn from(inv: Inventory) -> Self {
        Self {
            apps: inv.apps.into_iter().map(Into::into).collect(),
            taken_unix_ms: inv.taken_at.unix_millis(),
            more: false,
        }
    }
}

impl TryFrom<pb::Inventory> for Inventory {
    type Error = ConvertError;
    fn try_from(inv: pb::Inventory) -> Result<Self, Self::Error> {
        let mut parts = InventoryParts::new(usize::MAX, usize::MAX);
        match parts.push(inv)? {
            Some(whole) => Ok(whole),
            None => Err(ConvertError::Missing {
                field: "inventory: the parts after the first".to_owned(),
            }),
        }
    }
}

/// The largest part an inventory is sent in, encoded: far below gRPC's
/// 4 MiB message limit.
pub const INVENTORY_PART_BYTES: usize = 1 << 20;

/// An inventory on the wire, in parts of at most `max_part_bytes` encoded
/// bytes each (the last with `more = false`). An app whose description
/// alone is larger cannot be sent: it is left out and returned with its
/// encoded size, for the caller to report.
pub fn inventory_parts(
    inv: Inventory,
    max_part_bytes: usize,
) -> (Vec<pb::Inventory>, Vec<(App, usize)>) {
    let taken_unix_ms = inv.taken_at.unix_millis();
    let new_part = || pb::Inventory {
        apps: Vec::new(),
        taken_unix_ms,
        more: true,
    };
    let mut parts = vec![new_part()];
    let mut part_bytes = 0;
    let mut oversize = Vec::new();
    for app in inv.apps {
        let wire = pb::App::from(app.clone());
        // An app's share of a part: its bytes, a tag and a length prefix.
        let len = prost::Message::encoded_len(&wire);
        let cost = len + 1 + prost::encoding::encoded_len_varint(len as u64);
        if cost + 16 > max_part_bytes {
            oversize.push((app, len));
            continue;
        }
        if part_bytes + cost + 16 > max_part_bytes {
            parts.push(new_part());
            part_bytes = 0;
        }
        part_bytes += cost;
        if let Some(p) = parts.last_mut() {
            p.apps.push(wire);
        }
    }
    if let Some(last) = parts.last_mut() {
        last.more = false;
    }
    (parts, oversize)
}

/// Reassembles an inventory sent in parts; each part's apps are converted
/// (and validated) as it arrives, the whole is checked when the last part
/// is in. The parts of one inventory share its `taken_unix_ms`: a part of
/// another time starts a new inventory and drops the unfinished one.
#[derive(Debug)]
pub struct InventoryParts {
    apps: Vec<App>,
    taken_at: Option<Timestamp>,
    bytes: usize,
    max_apps: usize,
    max_bytes: usize,
}

impl InventoryParts {
    /// Refuses inventories of more than `max_apps` apps or `max_bytes`
    /// encoded bytes.
    pub fn new(max_apps: usize, max_bytes: usize) -> Self {
        Self {
            apps: Vec::new(),
            taken_at: None,
            bytes: 0,
            max_apps,
            max_bytes,
        }
    }

    /// Apps received so far of an inventory not yet complete.
    pub fn pending(&self) -> usize {
        self.apps.len()
    }

    /// Takes one part; returns the whole inventory with its last part. On
    /// error the parts received so far are dropped.
    pub fn push(&mut self, part: pb::Inventory) -> Result<Option<Inventory>, ConvertError> {
        let result = self.take(part);
        if !matches!(result, Ok(None)) {
            self.apps = Vec::new();
            self.taken_at = None;
            self.bytes = 0;
        }
        result
    }

    fn take(&mut self, part: pb::Inventory) -> Result<Option<Inventory>, ConvertError> {
        let taken_at = Timestamp::from_unix_millis(part.taken_unix_ms);
        if self.taken_at.is_some_and(|t| t != taken_at) {
            // The rest of the unfinished inventory will not come.
            self.apps.clear();
            self.bytes = 0;
        }
        self.taken_at = Some(taken_at);
        self.bytes = self
            .bytes
            .saturating_add(prost::Message::encoded_len(&part));
        if self.bytes > self.max_bytes {
            return Err(ConvertError::TooLarge {
                field: "inventory".to_owned(),
                reason: format!("more than {} bytes in one inventory", self.max_bytes),
            });
        }
        if self.apps.len().saturating_add(part.apps.len()) > self.max_apps {
            return Err(ConvertError::TooLarge {
                field: "inventory.apps".to_owned(),
                reason: format!("more than {} apps in one inventory", self.max_apps),
            });
        }
        let first = self.apps.len();
        for (i, a) in part.apps.into_iter().enumerate() {
            let app = app_from_pb(a, &format!("inventory.apps[{}]", first + i))?;
            self.apps.push(app);
        }
        if part.more {
            return Ok(None);
        }
        self.taken_at = None;
        self.bytes = 0;
        let out = Inventory {
            apps: std::mem::take(&mut self.apps),
            taken_at,
        };
        out.validate()
            .map_err(|source| ConvertError::Inconsistent {
                field: "inventory.apps".to_owned(),
                source: Box::new(source),
            })?;
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::{CodedError, ErrorCode, HostPath, UnitName};

    fn sample() -> Inventory {
        let argv = |s: &[&str]| Argv::new(s.iter().map(|&a| a.to_owned()).collect()).expect("argv");
        Inventory {
            taken_at: Timestamp::from_unix_millis(1_700_000_000_123),
            apps: vec![App {
                name: "shop".parse().expect("app"),
                team: "web".parse().expect("team"),
                volumes: vec![Volume {
                    name: "/srv/db".parse().expect("volume"),
                    path: HostPath::new("/srv/db").expect("path"),
                }],
                components: vec![
                    Component {
                        name: "postgresql@15-main.service".parse().expect("name"),
                        kind: ComponentKind::Host(HostComponent::Systemd {
                            unit: UnitName::new("postgresql@15-main.service").expect("unit"),
                        }),
                        stateful: true,
                        volumes: vec!["/srv/db".parse().expect("volume")],
                        depends_on: vec![],
                        state: ComponentState::Running,
                        hooks: Default::default(),
                    },
                    Component {
                        name: "worker".parse().expect("name"),
                        kind: ComponentKind::Host(HostComponent::Commands {
                            start: argv(&["/bin/sh", "-c", "worker &"]),
                            stop: argv(&["pkill", "-x", "worker"]),
                            status: Some(argv(&["pgrep", "-x", "worker"])),
                        }),
                        stateful: false,
                        volumes: vec![],
                        depends_on: vec!["postgresql@15-main.service".parse().expect("name")],
                        state: ComponentState::Stopped,
                        hooks: Default::default(),
                    },
                ],
            }],
        }
    }

    #[test]
    fn valid_inventories_round_trip() {
        let inv = sample();
        let wire = pb::Inventory::from(inv.clone());
        assert_eq!(wire.taken_unix_ms, 1_700_000_000_123);
        // Through the real encoding, too.
        let bytes = prost::Message::encode_to_vec(&wire);
        let decoded: pb::Inventory = prost::Message::decode(bytes.as_slice()).expect("decode");
        assert_eq!(Inventory::try_from(decoded).expect("valid"), inv);
        let commands_without_status = {
            let mut i = sample();
            if let ComponentKind::Host(HostComponent::Commands { status, .. }) =
                &mut i.apps[0].components[1].kind
            {
                *status = None;
            }
            i
        };
        let back = Inventory::try_from(pb::Inventory::from(commands_without_status.clone()))
            .expect("valid");
        assert_eq!(back, commands_without_status);

        // A container component, and one without an id (refused).
        let mut containers = sample();
        containers.apps[0].components[1].kind = ComponentKind::Container(ContainerComponent {
            id: "6cf5b2c8186d".into(),
            name: "shop-worker-1".into(),
            image: "ferry-test/base:1".into(),
            image_id: "sha256:8ed490d977df".into(),
            mounts: vec![
                ContainerMount {
                    destination: "/data".into(),
                    source: "shop_data".into(),
                    kind: "volume".into(),
                    read_only: false,
                    backup: MountBackup::Volume,
                },
                ContainerMount {
                    destination: "/etc/app.conf".into(),
                    source: "/srv/shop/app.conf".into(),
                    kind: "bind".into(),
                    read_only: true,
                    backup: MountBackup::File,
                },
                ContainerMount {
                    destination: "/usr".into(),
                    source: "/usr".into(),
                    kind: "bind".into(),
                    read_only: true,
                    backup: MountBackup::Config,
                },
                ContainerMount {
                    destination: "/var/run/docker.sock".into(),
                    source: "/var/run/docker.sock".into(),
                    kind: "bind".into(),
                    read_only: false,
                    backup: MountBackup::Skipped("a socket".into()),
                },
                ContainerMount {
                    destination: "/gone".into(),
                    source: "/srv/gone".into(),
                    kind: "bind".into(),
                    read_only: false,
                    backup: MountBackup::Refused("its source is missing".into()),
                },
            ],
        });
        let wire = pb::Inventory::from(containers.clone());
        assert_eq!(
            Inventory::try_from(wire.clone()).expect("valid"),
            containers
        );
        let mut no_id = wire;
        if let Some(pb::component::Kind::Container(c)) = &mut no_id.apps[0].components[1].kind {
            c.id.clear();
        }
        let err = Inventory::try_from(no_id).expect_err("refused");
        assert!(err.to_string().contains("container.id"), "{err}");
    }

    fn refused(mutate: impl FnOnce(&mut pb::Inventory)) -> ConvertError {
        let mut wire = pb::Inventory::from(sample());
        mutate(&mut wire);
        let err = Inventory::try_from(wire).expect_err("must be refused");
        assert_eq!(err.code(), ErrorCode::InvalidArgument);
        err
    }

    fn host(c: &mut pb::Component) -> &mut pb::HostComponent {
        match &mut c.kind {
            Some(pb::component::Kind::Host(h)) => h,
            _ => panic!("sample components are host components"),
        }
    }

    type Mutation = Box<dyn FnOnce(&mut pb::Inventory)>;

    #[test]
    fn bad_names_are_refused_naming_the_field() {
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|w| w.apps[0].name = "Shop".into()),
                "inventory.apps[0].name: invalid app name \"Shop\"",
            ),
            (
                Box::new(|w| w.apps[0].team = String::new()),
                "inventory.apps[0].team: invalid team name \"\": must not be empty",
            ),
            (
                Box::new(|w| w.apps[0].components[1].name = "a/b".into()),
                "inventory.apps[0].components[1].name: invalid component name \"a/b\"",
            ),
            (
                Box::new(|w| w.apps[0].volumes[0].path = "relative".into()),
                "inventory.apps[0].volumes[0].path: invalid volume path \"relative\"",
            ),
            (
                Box::new(|w| w.apps[0].components[0].volumes[0] = "bad\nname".into()),
                "inventory.apps[0].components[0].volumes[0]: invalid volume name",
            ),
            (
                Box::new(|w| w.apps[0].components[1].depends_on[0] = "x y".into()),
                "inventory.apps[0].components[1].depends_on[0]: invalid component name",
            ),
            (
                Box::new(|w| {
                    host(&mut w.apps[0].components[0]).control =
                        Some(pb::host_component::Control::Systemd(pb::SystemdUnit {
                            unit: " ".into(),
                        }));
                }),
                "inventory.apps[0].components[0].host.systemd.unit: invalid systemd unit",
            ),
        ];
        for (mutate, needle) in cases {
            let err = refused(mutate);
            assert!(
                err.to_string().starts_with(needle),
                "{needle:?} is not the start of {err}"
            );
        }
    }

    #[test]
    fn missing_or_bad_kinds_are_refused_naming_the_field() {
        let err = refused(|w| w.apps[0].components[1].kind = None);
        assert_eq!(err.field(), "inventory.apps[0].components[1].kind");
        assert_eq!(
            err.to_string(),
            "inventory.apps[0].components[1].kind is missing"
        );

        let err = refused(|w| host(&mut w.apps[0].components[1]).control = None);
        assert_eq!(err.field(), "inventory.apps[0].components[1].host.control");

        let err = refused(|w| {
            if let Some(pb::host_component::Control::Commands(c)) =
                &mut host(&mut w.apps[0].components[1]).control
            {
                c.stop = None;
            }
        });
        assert_eq!(
            err.field(),
            "inventory.apps[0].components[1].host.commands.stop"
        );

        let err = refused(|w| {
            if let Some(pb::host_component::Control::Commands(c)) =
                &mut host(&mut w.apps[0].components[1]).control
            {
                c.start = Some(pb::Argv { args: vec![] });
            }
        });
        assert!(
            err.to_string().starts_with(
                "inventory.apps[0].components[1].host.commands.start: invalid command"
            ),
            "{err}"
        );
    }

    #[test]
    fn inconsistent_apps_are_refused_naming_the_app() {
        let err = refused(|w| w.apps[0].components[0].volumes[0] = "/elsewhere".into());
        assert_eq!(err.field(), "inventory.apps[0]");
        assert!(err.to_string().contains("uses volume /elsewhere"), "{err}");

        let err = refused(|w| {
            let again = w.apps[0].clone();
            w.apps.push(again);
        });
        assert!(
            err.to_string()
                .contains("app shop of team web: the app is listed twice"),
            "{err}"
        );
    }

    #[test]
    fn unknown_states_read_as_unknown() {
        let mut wire = pb::Inventory::from(sample());
        wire.apps[0].components[0].state = 99;
        wire.apps[0].components[1].state = 0;
        let inv = Inventory::try_from(wire).expect("valid");
        assert_eq!(inv.apps[0].components[0].state, ComponentState::Unknown);
        assert_eq!(inv.apps[0].components[1].state, ComponentState::Unknown);
    }

    #[test]
    fn a_single_app_converts_with_its_own_field_names() {
        let mut wire = pb::App::from(sample().apps.remove(0));
        assert!(App::try_from(wire.clone()).is_ok());
        wire.components[0].name = String::new();
        let err = App::try_from(wire).expect_err("empty name");
        assert_eq!(err.field(), "app.components[0].name");
    }

    /// `n` copies of the sample app under distinct names.
    fn many(n: usize) -> Inventory {
        let mut inv = sample();
        let one = inv.apps.remove(0);
        inv.apps = (0..n)
            .map(|i| App {
                name: format!("shop-{i:04}").parse().expect("app"),
                ..one.clone()
            })
            .collect();
        inv
    }

    #[test]
    fn a_large_inventory_goes_in_parts_and_comes_back_whole() {
        let inv = many(500);
        let (parts, oversize) = inventory_parts(inv.clone(), 16 << 10);
        assert!(oversize.is_empty());
        assert!(parts.len() > 3, "{} parts", parts.len());
        for (i, p) in parts.iter().enumerate() {
            assert!(
                prost::Message::encoded_len(p) <= 16 << 10,
                "part {i} too large"
            );
            assert_eq!(p.more, i + 1 < parts.len());
            assert_eq!(p.taken_unix_ms, inv.taken_at.unix_millis());
        }
        let mut whole = InventoryParts::new(1000, usize::MAX);
        let mut got = None;
        for p in parts {
            assert!(got.is_none(), "whole before the last part");
            got = whole.push(p).expect("valid part");
        }
        assert_eq!(got, Some(inv));
        assert_eq!(whole.pending(), 0);
        // Small inventories stay one message.
        let (parts, _) = inventory_parts(sample(), INVENTORY_PART_BYTES);
        assert_eq!(parts.len(), 1);
        assert!(!parts[0].more);
    }

    #[test]
    fn parts_are_checked_as_they_come_and_as_a_whole() {
        // Too many apps in all.
        let (parts, _) = inventory_parts(many(50), 4 << 10);
        let mut whole = InventoryParts::new(20, usize::MAX);
        let err = parts
            .into_iter()
            .find_map(|p| whole.push(p).err())
            .expect("refused");
        assert!(err.to_string().contains("more than 20 apps"), "{err}");
        assert_eq!(whole.pending(), 0, "a refused inventory is dropped");
        // An app listed in two parts.
        let (mut parts, _) = inventory_parts(many(2), 1 << 20);
        let mut second = parts.remove(0);
        let mut first = second.clone();
        first.more = true;
        second.apps.truncate(1);
        let mut whole = InventoryParts::new(100, usize::MAX);
        assert_eq!(whole.push(first).expect("first"), None);
        let err = whole.push(second).expect_err("duplicate");
        assert_eq!(err.field(), "inventory.apps");
        // A bad app names its index across parts.
        let (mut parts, _) = inventory_parts(many(2), 1 << 20);
        let mut second = parts.remove(0);
        let mut first = second.clone();
        first.more = true;
        first.apps.truncate(1);
        second.apps = vec![second.apps[1].clone()];
        second.apps[0].name = "Bad Name".into();
        let mut whole = InventoryParts::new(100, usize::MAX);
        whole.push(first).expect("first");
        let err = whole.push(second).expect_err("bad name");
        assert_eq!(err.field(), "inventory.apps[1].name");
        // Too many bytes in all.
        let (parts, _) = inventory_parts(many(50), 4 << 10);
        let mut whole = InventoryParts::new(1000, 8 << 10);
        let err = parts
            .into_iter()
            .find_map(|p| whole.push(p).err())
            .expect("refused");
        assert!(err.to_string().contains("bytes in one inventory"), "{err}");
        // An unfinished inventory is dropped when a newer one starts.
        let (mut old, _) = inventory_parts(many(40), 4 << 10);
        old.truncate(2);
        let mut newer = many(3);
        newer.taken_at = Timestamp::from_unix_millis(newer.taken_at.unix_millis() + 1);
        let (new_parts, _) = inventory_parts(newer.clone(), 1 << 20);
        let mut whole = InventoryParts::new(1000, usize::MAX);
        for p in old {
            assert_eq!(whole.push(p).expect("old part"), None);
        }
        let mut got = None;
        for p in new_parts {
            got = whole.push(p).expect("new part");
        }
        assert_eq!(got, Some(newer));
        // An app larger than a part is left out, and said so.
        let (parts, oversize) = inventory_parts(many(3), 64);
        assert_eq!(oversize.len(), 3);
        assert_eq!(parts.len(), 1);
        assert!(parts[0].apps.is_empty() && !parts[0].more);
    }
}
