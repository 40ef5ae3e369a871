//! The CPU kernels' instruction-set tier: the best this CPU runs, detected once, or the one
//! `EXPANSE_CPU` names (for tests and benchmarks); every CPU kernel picks its inner loop by it, and
//! reports name it beside their figures with the CPU's model and features.

use std::sync::OnceLock;

/// An instruction-set tier of the CPU kernels, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    /// Plain Rust, vectorised by the compiler for the build's baseline (SSE2 on x86-64).
    Portable,
    /// AVX2 + FMA inner loops (x86-64).
    Avx2,
    /// 512-bit AVX-512F/BW loops for the f32 products (bf16 weights widened to f32 as on AVX2).
    Avx512,
    /// AVX512_BF16 on top: bf16 products multiply stored bf16 pairs exactly (`vdpbf16ps`), nothing
    /// widened; the instruction treats denormal inputs and results as zero.
    Avx512Bf16,
}

impl Tier {
    pub const ALL: [Tier; 4] = [Tier::Portable, Tier::Avx2, Tier::Avx512, Tier::Avx512Bf16];

    pub fn name(self) -> &'static str {
        match self {
            Tier::Portable => "portable",
            Tier::Avx2 => "avx2",
            Tier::Avx512 => "avx512",
            Tier::Avx512Bf16 => "avx512bf16",
        }
    }

    /// Whether this CPU can run the tier's kernels (each tier runs the lower tiers' loops too).
    pub fn supported(self) -> bool {
        match self {
            Tier::Portable => true,
            Tier::Avx2 => has("avx2") && has("fma"),
            Tier::Avx512 => Tier::Avx2.supported() && has("avx512f") && has("avx512bw"),
            Tier::Avx512Bf16 => Tier::Avx512.supported() && has("avx512bf16"),
        }
    }

    /// Every tier this CPU runs, lowest first (what the kernels' tests cover on this machine).
    pub fn available() -> Vec<Tier> {
        Tier::ALL.into_iter().filter(|t| t.supported()).collect()
    }

    /// The best tier this CPU runs.
    pub fn best() -> Tier {
        Tier::ALL.into_iter().rev().find(|t| t.supported()).unwrap_or(Tier::Portable)
    }

    /// Whether the AVX2 + FMA loops may run.
    pub fn avx2(self) -> bool {
        self >= Tier::Avx2
    }

    /// Whether the AVX-512F/BW loops may run.
    pub fn avx512(self) -> bool {
        self >= Tier::Avx512
    }

    /// Whether the AVX512_BF16 loops may run.
    pub fn avx512bf16(self) -> bool {
        self >= Tier::Avx512Bf16
    }

    /// Whether the 8-bit integer dots may use AVX512-VNNI (`vpdpbusd`, `vpdpwssd` on 256-bit
    /// vectors): an AVX-512 tier on a CPU with VNNI and VL. Not a tier of its own: every AVX512_BF16
    /// CPU has it, and an AVX-512 CPU without it (Skylake-X) runs the AVX2 integer dots.
    pub fn int8_vnni(self) -> bool {
        self.int8() && self.avx512() && has("avx512vnni") && has("avx512vl")
    }

    /// Whether the AVX2 integer dots of the quantized products may run: an AVX2 tier on a CPU with
    /// F16C (they read f16 block scales with it; every AVX2 CPU has it, a VM may hide it).
    pub fn int8(self) -> bool {
        self.avx2() && has("f16c")
    }
}

/// The tier `EXPANSE_CPU` asks for (None when unset or empty), or why it cannot be had.
fn requested() -> Result<Option<Tier>, String> {
    let Ok(value) = std::env::var("EXPANSE_CPU") else { return Ok(None) };
    let value = value.trim().to_ascii_lowercase();
    if value.is_empty() {
        return Ok(None);
    }
    let tier = Tier::ALL.into_iter().find(|t| t.name() == value).ok_or_else(|| {
        let names: Vec<&str> = Tier::ALL.iter().map(|t| t.name()).collect();
        format!("`{value}`: expected one of {}", names.join(", "))
    })?;
    if !tier.supported() {
        return Err(format!("`{value}`: this CPU lacks it ({}: {})", cpu_model(), features().join(" ")));
    }
    Ok(Some(tier))
}

/// Checks `EXPANSE_CPU` (commands call this when they choose a device, so a bad value is an error
/// naming the variable before anything runs) and returns the tier the kernels use.
pub fn check_env() -> Result<Tier, String> {
    requested()?;
    Ok(active())
}

/// The tier every CPU kernel uses in this process: `EXPANSE_CPU` when it names a tier this CPU runs
/// (`check_env` refuses any other value before work starts), else the best one. Read once.
pub fn active() -> Tier {
    static ACTIVE: OnceLock<Tier> = OnceLock::new();
    *ACTIVE.get_or_init(|| requested().ok().flatten().unwrap_or_else(Tier::best))
}

fn has(feature: &str) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match feature {
            "avx2" => std::arch::is_x86_feature_detected!("avx2"),
            "fma" => std::arch::is_x86_feature_detected!("fma"),
            "f16c" => std::arch::is_x86_feature_detected!("f16c"),
            "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
            "avx512bw" => std::arch::is_x86_feature_detected!("avx512bw"),
            "avx512vnni" => std::arch::is_x86_feature_detected!("avx512vnni"),
            "avx512vl" => std::arch::is_x86_feature_detected!("avx512vl"),
            "avx512bf16" => std::arch::is_x86_feature_detected!("avx512bf16"),
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = feature;
        false
    }
}

/// Whose cores these are, where that changes a kernel's best shape beside the instruction set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cores {
    /// AuthenticAMD (measured: a Zen 4).
    Amd,
    /// Any other (measured: an Intel Xeon with AVX-512, the tiles' first home).
    Other,
}

/// The [`Cores`] `EXPANSE_CORES` asks for (None when unset or empty), or why not: it forces the
/// other vendor's kernel shapes, to measure them side by side on one machine.
fn requested_cores() -> Result<Option<Cores>, String> {
    let Ok(value) = std::env::var("EXPANSE_CORES") else { return Ok(None) };
    match value.trim().to_ascii_lowercase().as_str() {
        "" => Ok(None),
        "amd" => Ok(Some(Cores::Amd)),
        "other" => Ok(Some(Cores::Other)),
        v => Err(format!("`{v}`: expected amd or other")),
    }
}

/// Checks `EXPANSE_CORES` as [`check_env`] does `EXPANSE_CPU`.
pub fn check_cores_env() -> Result<Cores, String> {
    requested_cores()?;
    Ok(cores())
}

/// The [`Cores`] the kernels shape themselves for: `EXPANSE_CORES` when set, else cpuid's vendor
/// string. Read once.
pub fn cores() -> Cores {
    static CORES: OnceLock<Cores> = OnceLock::new();
    *CORES.get_or_init(|| requested_cores().ok().flatten().unwrap_or_else(vendor))
}

/// cpuid's vendor string as [`Cores`] (Hygon's Zen-based cores count as other: not measured).
fn vendor() -> Cores {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: leaf 0 (the vendor string in ebx, edx, ecx) exists on every x86_64 CPU.
        #[allow(unused_unsafe)]
        let id = unsafe { std::arch::x86_64::__cpuid(0) };
        let vendor: Vec<u8> = [id.ebx, id.edx, id.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
        if vendor == b"AuthenticAMD" {
            return Cores::Amd;
        }
    }
    Cores::Other
}

/// The vector features that matter to the kernels, those this CPU has.
pub fn features() -> Vec<&'static str> {
    ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vnni", "avx512bf16"].into_iter().filter(|f| has(f)).collect()
}

/// The CPU's model name (`/proc/cpuinfo`; the architecture elsewhere).
pub fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, name)| name.trim().to_string())
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// `avx2 kernels · AMD EPYC (avx2 fma f16c)`: what a figure was measured with.
pub fn describe() -> String {
    let features = features();
    let features = if features.is_empty() { "no vector extensions".to_string() } else { features.join(" ") };
    format!("{} kernels · {} ({features})", active().name(), cpu_model())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_are_ordered_and_the_active_one_is_supported() {
        assert!(Tier::Portable < Tier::Avx2 && !Tier::Portable.avx2() && Tier::Avx2.avx2());
        assert!(!Tier::Avx2.avx512() && Tier::Avx512.avx512() && Tier::Avx512.avx2() && !Tier::Avx512.avx512bf16());
        assert!(Tier::Avx512Bf16.avx512bf16() && Tier::Avx512Bf16.avx512());
        assert!(active().supported() && Tier::available().contains(&active()));
        assert_eq!(Tier::available()[0], Tier::Portable, "every CPU runs the portable tier");
        // AVX2 is available exactly when the CPU reports both features it needs.
        let has = |f: &str| features().contains(&f);
        assert_eq!(Tier::Avx2.supported(), has("avx2") && has("fma"));
        assert_eq!(Tier::Avx512.supported(), has("avx2") && has("fma") && has("avx512f") && has("avx512bw"));
        assert_eq!(Tier::Avx512Bf16.supported(), Tier::Avx512.supported() && has("avx512bf16"));
        if let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") {
            let amd = info.lines().any(|l| l.starts_with("vendor_id") && l.ends_with("AuthenticAMD"));
            assert_eq!(vendor() == Cores::Amd, amd, "cpuid's vendor against /proc/cpuinfo's");
        }
        let d = describe();
        assert!(d.starts_with(&format!("{} kernels · ", active().name())) && d.contains(&cpu_model()), "{d}");
    }
}
