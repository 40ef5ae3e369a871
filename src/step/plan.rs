//! The decode step as plain data: the fused ops one token runs through, in order, with the buffers
//! and weights each reads and writes. Built once per model load; every backend executes the same list.

use crate::model::Model;

/// The step's activation buffers, allocated once (the widths of one row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buf {
    /// The residual stream `[hidden]`.
    X,
    /// The normed residual, input of the projections `[hidden]`.
    H,
    /// The last block output to add to the residual (o_proj's or down_proj's) `[hidden]`.
    D,
    /// q, k and v of the token `[(n_heads + 2·n_kv_heads)·head_dim]`.
    Qkv,
    /// The attention output `[n_heads·head_dim]`.
    Y,
    /// SiLU(gate)·up `[intermediate]`.
    Act,
    /// `[vocab]`.
    Logits,
}

/// One of each activation buffer, whatever a backend keeps them in (host vectors, device tensors):
/// `dims.batch` rows of each (one per sequence of a batched step, one otherwise).
#[derive(Debug, Clone)]
pub struct Buffers<B> {
    pub x: B,
    pub h: B,
    pub d: B,
    pub qkv: B,
    pub y: B,
    pub act: B,
    pub logits: B,
}

impl<B> Buffers<B> {
    /// Makes each buffer from its length (as `dims` gives it).
    pub fn new<E>(dims: &super::Dims, mut make: impl FnMut(usize) -> Result<B, E>) -> Result<Buffers<B>, E> {
        let b = dims.batch;
        Ok(Buffers {
            x: make(b * dims.hidden)?,
            h: make(b * dims.hidden)?,
            d: make(b * dims.hidden)?,
            qkv: make(b * dims.qkv())?,
            y: make(b * dims.n_heads * dims.head_dim)?,
            act: make(b * dims.intermediate)?,
            logits: make(b * dims.vocab)?,
        })
    }

    /// The same buffers seen through `f` (their addresses, say).
    pub fn map<C, E>(&self, mut f: impl FnMut(&B) -> Result<C, E>) -> Result<Buffers<C>, E> {
        Ok(Buffers { x: f(&self.x)?, h: f(&self.h)?, d: f(&self.d)?, qkv: f(&self.qkv)?, y: f(&self.y)?, act: f(&self.act)?, logits: f(&self.logits)? })
    }

    pub fn get(&self, b: Buf) -> &B {
        match b {
            Buf::X => &self.x,
            Buf::H => &self.h,
            Buf::D => &self.d,
            Buf::Qkv => &self.qkv,
            Buf::Y => &self.y,
            Buf::Act => &self.act,
            Buf::Logits => &self.logits,
        }
    }

    pub fn get_mut(&mut self, b: Buf) -> &mut B {
        match b {
            Buf::X => &mut self.x,
            Buf::H => &mut self.h,
            Buf::D => &mut self.d,
            Buf::Qkv => &mut self.qkv,
            Buf::Y => &mut self.y,
            Buf::Act => &mut self.act,
            Buf::Logits => &mut self.logits,
        }
    }
}

/// A weight the step reads (block indices are the model's, i.e. output layers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weight {
    Embed,
    FinalNorm,
    LmHead,
    InputNorm(usize),
    PostNorm(usize),
    Qkv(usize),
    O(usize),
    GateUp(usize),
    Down(usize),
}

/// What one op does. Each op is one kernel launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `x = embed[token]; h = rms_norm(x)·norm` (the first norm of the step).
    EmbedNorm { norm: Weight },
    /// `x += d; h = rms_norm(x)·norm`.
    AddNorm { norm: Weight },
    /// `dst = src · wᵀ`.
    Gemv { w: Weight, src: Buf, dst: Buf },
    /// `act = silu(h · gateᵀ) · (h · upᵀ)` over the stacked gate/up weight.
    GemvSiluMul { w: Weight },
    /// RoPE on the q and k of `qkv` at the token's position; k and v written into block's cache.
    RopeKv { block: usize },
    /// `y = attention(q, block's cache)`, split over the sequence when the plan has several splits
    /// (the splits merged in the same op: on CUDA, by the last block of each head group).
    Attention { block: usize },
    /// `next = argmax(logits)`.
    Argmax,
}

/// The names ops go by in warnings, traces and `--inject-fault LAYER:OP`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpName {
    InputNorm,
    QkvProj,
    RopeKv,
    Attention,
    /// No op of any plan now (the attention op merges its own splits); the name stays accepted so
    /// that `--inject-fault attention_combine` says there is no such op rather than failing to parse.
    AttentionCombine,
    OProj,
    PostNorm,
    GateUp,
    DownProj,
    FinalNorm,
    LmHead,
    Argmax,
}

impl OpName {
    pub const ALL: [OpName; 12] = [
        OpName::InputNorm,
        OpName::QkvProj,
        OpName::RopeKv,
        OpName::Attention,
        OpName::AttentionCombine,
        OpName::OProj,
        OpName::PostNorm,
        OpName::GateUp,
        OpName::DownProj,
        OpName::FinalNorm,
        OpName::LmHead,
        OpName::Argmax,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OpName::InputNorm => "input_layernorm",
            OpName::QkvProj => "qkv_proj",
            OpName::RopeKv => "rope_kv",
            OpName::Attention => "attention",
            OpName::AttentionCombine => "attention_combine",
            OpName::OProj => "o_proj",
            OpName::PostNorm => "post_attention_layernorm",
            OpName::GateUp => "gate_up_proj",
            OpName::DownProj => "down_proj",
            OpName::FinalNorm => "norm",
            OpName::LmHead => "lm_head",
            OpName::Argmax => "argmax",
        }
    }

    pub fn parse(s: &str) -> Option<OpName> {
        OpName::ALL.into_iter().find(|n| n.as_str() == s)
    }
}

/// One op of the step: what it does, and where it sits (for warnings and fault injection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    pub kind: Kind,
    pub name: OpName,
    /// The output layer the op belongs to (None for the ops after the last block).
    pub layer: Option<usize>,
}

impl Op {
    /// `layer 7 o_proj`, `norm`.
    pub fn describe(&self) -> String {
        match self.layer {
            Some(l) => format!("layer {l} {}", self.name.as_str()),
            None => self.name.as_str().to_string(),
        }
    }
}

/// The ops of one token, in order.
#[derive(Debug, Clone)]
pub struct Plan {
    pub ops: Vec<Op>,
    /// Splits of the attention over the cache (merged inside the attention op).
    pub splits: usize,
    /// The blocks the step executes, in order.
    pub blocks: Vec<usize>,
}

impl Plan {
    /// The step of `model` as it runs (blocks it skips are not in the plan), with attention split
    /// `splits` ways.
    pub fn new(model: &Model, splits: usize) -> Plan {
        let blocks: Vec<usize> = (0..model.blocks.len()).filter(|&b| model.runs(&model.blocks[b])).collect();
        let mut ops = Vec::with_capacity(blocks.len() * 8 + 3);
        let mut first = true;
        let mut norm = |norm: Weight, ops: &mut Vec<Op>, name: OpName, layer: Option<usize>| {
            let kind = if first { Kind::EmbedNorm { norm } } else { Kind::AddNorm { norm } };
            first = false;
            ops.push(Op { kind, name, layer });
        };
        for &b in &blocks {
            let at = Some(b);
            let op = |kind, name| Op { kind, name, layer: at };
            norm(Weight::InputNorm(b), &mut ops, OpName::InputNorm, at);
            ops.push(op(Kind::Gemv { w: Weight::Qkv(b), src: Buf::H, dst: Buf::Qkv }, OpName::QkvProj));
            ops.push(op(Kind::RopeKv { block: b }, OpName::RopeKv));
            ops.push(op(Kind::Attention { block: b }, OpName::Attention));
            ops.push(op(Kind::Gemv { w: Weight::O(b), src: Buf::Y, dst: Buf::D }, OpName::OProj));
            ops.push(Op { kind: Kind::AddNorm { norm: Weight::PostNorm(b) }, name: OpName::PostNorm, layer: at });
            ops.push(op(Kind::GemvSiluMul { w: Weight::GateUp(b) }, OpName::GateUp));
            ops.push(op(Kind::Gemv { w: Weight::Down(b), src: Buf::Act, dst: Buf::D }, OpName::DownProj));
        }
        norm(Weight::FinalNorm, &mut ops, OpName::FinalNorm, None);
        ops.push(Op { kind: Kind::Gemv { w: Weight::LmHead, src: Buf::H, dst: Buf::Logits }, name: OpName::LmHead, layer: None });
        ops.push(Op { kind: Kind::Argmax, name: OpName::Argmax, layer: None });
        Plan { ops, splits, blocks }
    }

    /// The buffer op's result lands in (what a self-check compares, and a fault perturbs): None for
    /// the argmax.
    pub fn output(&self, op: &Op) -> Option<Buf> {
        match op.kind {
            Kind::EmbedNorm { .. } | Kind::AddNorm { .. } => Some(Buf::H),
            Kind::Gemv { dst, .. } => Some(dst),
            Kind::GemvSiluMul { .. } => Some(Buf::Act),
            Kind::RopeKv { .. } => Some(Buf::Qkv),
            Kind::Attention { .. } => Some(Buf::Y),
            Kind::Argmax => None,
        }
    }

    /// Kernel launches per token: one per op.
    pub fn launches(&self) -> usize {
        self.ops.len()
    }

    /// The most launches any executed block takes (8: the split attention merges its own splits).
    pub fn max_launches_per_block(&self) -> usize {
        self.blocks.iter().map(|&b| self.ops.iter().filter(|o| o.layer == Some(b)).count()).max().unwrap_or(0)
    }
}
