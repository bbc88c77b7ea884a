//! Where each tile lives in a program instance's workspace: offsets shared by both back ends,
//! reusing storage once a tile is dead (liveness over the structured program).
//!
//! Each tile is live from its definition to its last use; a tile used inside a loop but defined
//! outside it stays live to the loop's end (the loop reads it again), and a loop's carried tiles
//! live through the whole loop. Tiles that share storage — a `reshape` and its operand, a loop's
//! carried argument and its result — form one group, live for the union of their intervals. So
//! does a loop's carried argument with the tile its body yields for it, when the argument is dead
//! by the time that tile is written (read before, or elementwise at the written element by the
//! operation that writes it): the yield then copies nothing (`Walk::in_place`;
//! `HLAC_YIELD_IN_PLACE=off` for A/B measurements).
//! Groups are placed first-fit in order of definition (or largest first: [`Packing`]); two
//! groups share storage only when one is defined after every use of the other, so an
//! instruction never overwrites one of its own operands ([`check`] tests exactly that). Every
//! offset is a multiple of 64 bytes.

use std::collections::{HashMap, HashSet};

use super::{Block, DType, Op, Program, Value};

/// Workspace offsets of every tile, and the workspace's size.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    offsets: HashMap<Value, u64>,
    /// Each stored tile's storage group (a `reshape` and its operand, a loop's carried argument
    /// and its result), named by one of its members.
    groups: HashMap<Value, Value>,
    /// Bytes the workspace needs (from offset 0).
    pub bytes: u64,
}

impl Layout {
    /// The offset of a tile (0 for a value that is not a tile).
    pub fn offset(&self, v: Value) -> u64 {
        self.offsets.get(&v).copied().unwrap_or(0)
    }

    /// The storage group of a stored tile (itself for a value that is not one): tiles of one group
    /// are one storage seen through different shapes, so a back end that permutes a tile's
    /// elements in storage must permute the whole group alike.
    pub fn group(&self, v: Value) -> Value {
        self.groups.get(&v).copied().unwrap_or(v)
    }

    /// Every stored tile with its offset, by offset (for diagnostics: which tiles make a workspace
    /// large).
    pub fn tiles(&self) -> Vec<(Value, u64)> {
        let mut t: Vec<(Value, u64)> = self.offsets.iter().map(|(v, o)| (*v, *o)).collect();
        t.sort_by_key(|(v, o)| (*o, v.0));
        t
    }
}

/// How a back end stores a program's tiles, where that differs from their types: tiles it
/// recomputes wherever they are read instead of storing them (`fused`: no storage), and f32 tiles
/// it keeps as 2-byte floats (`narrow`: the NVPTX back end's tensor-core operands, which the
/// products round to bf16 anyway, and its loads from bf16 memory).
#[derive(Debug, Clone, Default)]
pub struct Storage {
    /// Tiles with no storage.
    pub fused: HashSet<Value>,
    /// Tiles stored at 2 bytes per element.
    pub narrow: HashSet<Value>,
}

impl Storage {
    /// Only `fused` tiles differ from their types.
    pub fn fused(fused: HashSet<Value>) -> Storage {
        Storage { fused, narrow: HashSet::new() }
    }

    /// Bytes per element of tile `v` in storage.
    pub fn elem_bytes(&self, p: &Program, v: Value) -> u64 {
        if self.narrow.contains(&v) {
            return 2;
        }
        match p.ty(v).dtype {
            DType::Bool => 1,
            DType::I64 => 8,
            DType::Bf16 | DType::F16 | DType::F32 => 4,
        }
    }

    /// Bytes tile `v` takes, rounded up to 64.
    fn bytes_of(&self, p: &Program, v: Value) -> u64 {
        (p.ty(v).numel() * self.elem_bytes(p, v)).div_ceil(64) * 64
    }
}

#[derive(Default)]
struct Walk {
    pos: u64,
    def: HashMap<Value, u64>,
    last: HashMap<Value, u64>,
    /// Each tile's last read: [`Walk::last`] without a loop's hold on its carried tiles to its end
    /// (where the yield writes them; nothing reads them there).
    read: HashMap<Value, u64>,
    /// Each loop's carried tiles with their initial values, as (initial value, carried tile, the
    /// loop's start, the loop's end): [`Walk::init_in_place`] gives the carried tile its initial
    /// value's storage where that is dead once the loop starts.
    inits: Vec<(Value, Value, u64, u64)>,
    /// Union-find parent for storage groups.
    parent: HashMap<Value, Value>,
    /// Tiles a back end computes where they are used instead of storing them ([`plan_fused`]).
    fused: HashSet<Value>,
    /// For each fused tile, the stored values its computation reads.
    leaves: HashMap<Value, Vec<Value>>,
    /// For each fused tile, the leaves it reads at other elements than the one it computes
    /// (through a broadcast or a transpose): an operation must not overwrite those in place.
    cross: HashMap<Value, HashSet<Value>>,
    /// Each instruction's position and operation, by its single result (for the in-place test of
    /// a loop's yielded tiles).
    defining: HashMap<Value, (u64, Op)>,
}

impl Walk {
    fn find(&mut self, v: Value) -> Value {
        let p = *self.parent.get(&v).unwrap_or(&v);
        if p == v {
            return v;
        }
        let root = self.find(p);
        self.parent.insert(v, root);
        root
    }

    fn union(&mut self, a: Value, b: Value) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            self.parent.insert(rb, ra);
        }
    }

    fn use_at(&mut self, v: Value, at: u64) {
        self.hold(v, at);
        let e = self.read.entry(v).or_insert(at);
        *e = (*e).max(at);
    }

    /// Keeps `v`'s storage to position `at` without reading it there.
    fn hold(&mut self, v: Value, at: u64) {
        let e = self.last.entry(v).or_insert(at);
        *e = (*e).max(at);
    }

    /// Walks a block; `loops` holds the (start, end) positions of the enclosing loops.
    fn block(&mut self, p: &Program, b: &Block, loops: &mut Vec<(u64, u64, Vec<Value>)>) {
        for inst in &b.insts {
            self.pos += 1;
            let here = self.pos;
            let mut direct = Vec::new();
            inst.op.operands(&mut direct);
            // A fused operand is computed here from its leaves, so here is where they are read.
            let mut operands = Vec::new();
            for v in direct {
                match self.leaves.get(&v) {
                    Some(l) => operands.extend(l.iter().copied()),
                    None => operands.push(v),
                }
            }
            if let Some(r) = inst.results.first().filter(|r| self.fused.contains(r)) {
                // Leaves read at another element: every leaf of a broadcast or transpose, and
                // whatever the fused operands read so.
                let mut cross = HashSet::new();
                let mut direct = Vec::new();
                inst.op.operands(&mut direct);
                // Only elementwise operations and reshapes read each operand at the element they
                // compute; anything else (a broadcast, a transpose, a product) reads others.
                let moves =
                    !matches!(inst.op, Op::Unary(..) | Op::Binary(..) | Op::Cmp(..) | Op::Select { .. } | Op::Cast(..) | Op::Reshape(_));
                for v in &direct {
                    match self.leaves.get(v) {
                        Some(l) if moves => cross.extend(l.iter().copied()),
                        Some(_) => cross.extend(self.cross.get(v).into_iter().flatten().copied()),
                        None if moves => {
                            cross.insert(*v);
                        }
                        None => {}
                    }
                }
                self.cross.insert(*r, cross);
                self.def.insert(*r, here);
                self.leaves.insert(*r, operands);
                continue;
            }
            if let [r] = inst.results[..] {
                self.defining.insert(r, (here, inst.op.clone()));
            }
            for v in operands {
                self.use_at(v, here);
                // A value defined outside an enclosing loop is read again on every iteration.
                for (start, end, _) in loops.iter() {
                    if self.def.get(&v).is_some_and(|d| *d < *start) {
                        self.use_at(v, *end);
                    }
                }
            }
            match &inst.op {
                Op::For { body, init, .. } => {
                    // The loop occupies positions here..end; its body is walked inside.
                    let start = here;
                    for a in &body.args {
                        self.def.insert(*a, start);
                    }
                    loops.push((start, u64::MAX, body.args.clone()));
                    let before = self.pos;
                    // First pass to learn the end position, then walk for real.
                    let end = before + count(body) + 1;
                    if let Some(l) = loops.last_mut() {
                        l.1 = end;
                    }
                    self.block(p, body, loops);
                    loops.pop();
                    // Uses of each carried tile inside the body (before the loop's own use at its
                    // end, below).
                    let inside: Vec<u64> = body.args.iter().map(|a| self.last.get(a).copied().unwrap_or(start)).collect();
                    self.pos = end;
                    for a in &body.args {
                        self.hold(*a, end);
                    }
                    for (x, a) in init.iter().zip(body.args.iter().skip(1)) {
                        self.inits.push((*x, *a, start, end));
                    }
                    for (k, r) in inst.results.iter().enumerate() {
                        self.def.insert(*r, end);
                        if let Some(arg) = body.args.get(k + 1) {
                            self.union(*arg, *r);
                        }
                    }
                    if let Some(super::Inst { op: Op::Yield(next), .. }) = body.insts.last() {
                        let mut taken = HashSet::new();
                        for (k, y) in next.iter().enumerate() {
                            let Some(&arg) = body.args.get(k + 1) else { continue };
                            if taken.insert(*y) && self.in_place(p, arg, *y, start, end, inside[k + 1]) {
                                self.union(arg, *y);
                            }
                        }
                    }
                }
                Op::Reshape(a) => {
                    for r in &inst.results {
                        self.def.insert(*r, here);
                        if !p.ty(*a).is_scalar() && !p.ty(*r).is_scalar() {
                            self.union(*a, *r);
                        }
                    }
                }
                _ => {
                    for r in &inst.results {
                        self.def.insert(*r, here);
                    }
                }
            }
        }
    }
}

impl Walk {
    /// Whether a loop (positions `start..end`) may compute its yielded tile `y` straight into the
    /// storage of carried tile `arg`, whose last read inside the body is at `last_inside`, saving
    /// the copy at the end of each iteration: `y` is a stored tile defined in the body by an
    /// operation of its own (not a loop, not a view of another tile), no other tile of `y`'s group
    /// exists, and `arg` is dead when `y` is written — read before `y`'s definition, or by that
    /// definition only if it is elementwise and reads `arg` at the element it writes (same thread,
    /// same index, on every back end). `arg` must have no views (reshapes) of its own.
    fn in_place(&mut self, p: &Program, arg: Value, y: Value, start: u64, end: u64, last_inside: u64) -> bool {
        // HLAC_YIELD_IN_PLACE=off keeps every yield a copy, for A/B measurements.
        if std::env::var("HLAC_YIELD_IN_PLACE").is_ok_and(|v| v == "off") {
            return false;
        }
        if y == arg || p.ty(y).is_scalar() || self.fused.contains(&y) || p.ty(y) != p.ty(arg) {
            return false;
        }
        let Some((def, op)) = self.defining.get(&y).cloned() else { return false };
        if def <= start || def >= end {
            return false;
        }
        // `y` and `arg` alone in their groups (apart from the loop's result, already `arg`'s).
        let (ry, ra) = (self.find(y), self.find(arg));
        let members: Vec<Value> = self.def.keys().copied().collect();
        for m in members {
            let r = self.find(m);
            if (r == ry && m != y) || (r == ra && m != arg && self.def.get(&m).is_some_and(|d| *d != end)) {
                return false;
            }
        }
        if last_inside < def {
            return true;
        }
        if last_inside > def {
            return false;
        }
        // Read by `y`'s own definition: only an elementwise operation at its own index.
        if !matches!(op, Op::Unary(..) | Op::Binary(..) | Op::Cmp(..) | Op::Select { .. } | Op::Cast(..)) {
            return false;
        }
        let mut direct = Vec::new();
        op.operands(&mut direct);
        direct.iter().all(|v| !self.cross.get(v).is_some_and(|c| c.contains(&arg)))
    }
}

impl Walk {
    /// After the walk: gives each loop's carried tile the storage of its initial value where that
    /// is read last by the loop's start (so the copy into the carried tile at the start goes, and
    /// one storage serves both: a nest of loops accumulating into one tile — attention's
    /// `bwd_dkv` over the group's heads and their query blocks — holds it once instead of once a
    /// level). The initial value is a stored tile of the carried tile's type, no loop's initial
    /// value twice, and every other tile of its group is defined and read last by the loop's
    /// start too, or defined at its end or later. `HLAC_INIT_IN_PLACE=off` keeps every initial
    /// copy, for A/B measurements.
    fn init_in_place(&mut self, p: &Program, storage: &Storage) {
        if std::env::var("HLAC_INIT_IN_PLACE").is_ok_and(|v| v == "off") {
            return;
        }
        let mut taken = HashSet::new();
        let members: Vec<Value> = self.def.keys().copied().collect();
        for (x, arg, start, end) in std::mem::take(&mut self.inits) {
            let stored = |v: Value| !p.ty(v).is_scalar() && !self.fused.contains(&v) && !storage.narrow.contains(&v);
            if !stored(x) || !stored(arg) || p.ty(x) != p.ty(arg) || !taken.insert(x) {
                continue;
            }
            let root = self.find(x);
            let dead = members.iter().all(|&m| {
                let def = self.def.get(&m).copied().unwrap_or(0);
                self.find(m) != root || (def <= start && self.read.get(&m).copied().unwrap_or(def) <= start) || def >= end
            });
            if dead {
                self.union(x, arg);
            }
        }
    }
}

/// Instructions in a block, nested ones included.
fn count(b: &Block) -> u64 {
    b.insts.iter().map(|i| 1 + if let Op::For { body, .. } = &i.op { count(body) + 1 } else { 0 }).sum()
}

/// Plans the workspace of a verified program.
pub fn plan(p: &Program) -> Layout {
    plan_fused(p, &Storage::default())
}

/// Plans the workspace of a verified program whose back end does not store the tiles in
/// `storage.fused` (elementwise values it recomputes, element by element, wherever they are read):
/// they get no storage, and the stored values their computation reads (their leaves) stay live
/// until the fused tile's last use. A fused tile must not be a loop's carried value or a reshape of
/// a stored tile. Tiles in `storage.narrow` take 2 bytes per element; such a tile must be alone in
/// its storage group (no reshape of it, not carried by a loop).
///
/// `HLAC_PACK=largest` selects [`Packing::LargestFirst`] for both back ends, `HLAC_PACK=best`
/// whichever of the two packings is smaller, kernel by kernel (for A/B measurements; not yet
/// measured on a GPU).
pub fn plan_fused(p: &Program, storage: &Storage) -> Layout {
    match std::env::var("HLAC_PACK").as_deref() {
        Ok("largest") => plan_packed(p, storage, Packing::LargestFirst),
        Ok("best") => {
            let (a, b) = (plan_packed(p, storage, Packing::Definition), plan_packed(p, storage, Packing::LargestFirst));
            if b.bytes < a.bytes {
                b
            } else {
                a
            }
        }
        _ => plan_packed(p, storage, Packing::Definition),
    }
}

/// The order in which [`plan_packed`] places storage groups, each at the lowest offset where it
/// overlaps no group live at the same time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    /// In order of definition (both back ends' default).
    Definition,
    /// Largest first, then in order of definition: packs closer to the peak of live bytes when
    /// large and small tiles interleave (GDN's forward at K = V = 128, bf16, with the NVPTX back
    /// end's fusion: 197 KB, its peak, instead of 247), so more kernels fit one block's shared memory.
    LargestFirst,
}

/// The stored tiles, each with its storage group's root, and each group's (definition, last use,
/// bytes).
type Groups = (Vec<(Value, Value)>, HashMap<Value, (u64, u64, u64)>);

fn groups_of(p: &Program, storage: &Storage) -> Groups {
    let fused = &storage.fused;
    let mut w = Walk { fused: fused.clone(), ..Walk::default() };
    w.block(p, &p.body, &mut Vec::new());
    w.init_in_place(p, storage);
    let mut groups: HashMap<Value, (u64, u64, u64)> = HashMap::new();
    let mut tiles: Vec<(Value, Value)> = Vec::new();
    let stored: Vec<Value> = w.def.keys().copied().filter(|v| !p.ty(*v).is_scalar() && !fused.contains(v)).collect();
    for v in stored {
        let root = w.find(v);
        let d = w.def.get(&v).copied().unwrap_or(0);
        let l = w.last.get(&v).copied().unwrap_or(d);
        let size = storage.bytes_of(p, v);
        let e = groups.entry(root).or_insert((d, l, size));
        e.0 = e.0.min(d);
        e.1 = e.1.max(l);
        e.2 = e.2.max(size);
        tiles.push((v, root));
    }
    (tiles, groups)
}

/// Checks a layout of `p` (planned with `storage`): every stored tile has the offset of its
/// storage group, and no two groups live at the same time share a byte. For tests of the
/// packings; the liveness is the planner's own.
pub fn check(p: &Program, storage: &Storage, layout: &Layout) -> Result<(), String> {
    let (tiles, groups) = groups_of(p, storage);
    let mut at: HashMap<Value, u64> = HashMap::new();
    for (v, root) in &tiles {
        let o = layout.offset(*v);
        if *at.entry(*root).or_insert(o) != o {
            return Err(format!("{v} is not at its storage group's offset"));
        }
    }
    let placed: Vec<(Value, u64, (u64, u64, u64))> = groups.iter().map(|(r, g)| (*r, at.get(r).copied().unwrap_or(0), *g)).collect();
    for (i, (ra, oa, (da, la, sa))) in placed.iter().enumerate() {
        if oa + sa > layout.bytes {
            return Err(format!("{ra}'s storage ends past the workspace's {} bytes", layout.bytes));
        }
        for (rb, ob, (db, lb, sb)) in &placed[i + 1..] {
            let live_together = !(la < db || lb < da);
            let share = oa < &(ob + sb) && ob < &(oa + sa);
            if live_together && share {
                return Err(format!("{ra} and {rb} are live together and share bytes"));
            }
        }
    }
    Ok(())
}

/// [`plan_fused`] with a choice of [`Packing`].
pub fn plan_packed(p: &Program, storage: &Storage, packing: Packing) -> Layout {
    let (tiles, groups) = groups_of(p, storage);
    let mut order: Vec<(Value, (u64, u64, u64))> = groups.into_iter().collect();
    match packing {
        Packing::Definition => order.sort_by_key(|(v, (d, _, _))| (*d, v.0)),
        Packing::LargestFirst => order.sort_by_key(|(v, (d, _, s))| (std::cmp::Reverse(*s), *d, v.0)),
    }
    // Placed groups: (offset, size, definition, last use).
    let mut placed: Vec<(u64, u64, u64, u64)> = Vec::new();
    let mut root_offset: HashMap<Value, u64> = HashMap::new();
    let mut bytes = 0u64;
    for (root, (def, last, size)) in order {
        // First fit among offsets whose occupants are all dead before `def` or born after `last`.
        let mut candidates: Vec<u64> = std::iter::once(0).chain(placed.iter().map(|(o, s, _, _)| o + s)).collect();
        candidates.sort_unstable();
        let fits = |at: u64| placed.iter().all(|(o, s, d, l)| *l < def || last < *d || at + size <= *o || *o + s <= at);
        let at = candidates.into_iter().find(|c| fits(*c)).unwrap_or(bytes);
        placed.push((at, size, def, last));
        root_offset.insert(root, at);
        bytes = bytes.max(at + size);
    }
    let mut offsets = HashMap::new();
    let mut group_of = HashMap::new();
    for (v, root) in tiles {
        offsets.insert(v, root_offset.get(&root).copied().unwrap_or(0));
        group_of.insert(v, root);
    }
    Layout { offsets, groups: group_of, bytes }
}
