# Build the PYNQ-Z2 overlay: Zynq PS7 + AXI DMA (simple mode) + the sparsa IP; writes
# bitstreams/build/<name>.bit and <name>.hwh, the pair pynq.Overlay loads, only when the routed
# design meets timing (setup and hold): a bitstream that misses timing computes wrong results.
# SPARSA_ALLOW_TIMING_FAILURE=1 in the environment writes it all the same, with a warning.
#
#   vivado -mode batch -source bitstreams/package_ip.tcl -tclargs bitstreams/build/sparsa_accel.v
#   vivado -mode batch -source bitstreams/build_overlay.tcl [-tclargs <name> <clock MHz> <jobs> <stream bits>]
#
# <clock MHz> and <stream bits> default to those the IP was packaged with (package_ip.tcl writes
# them to build/ip/clock_mhz and build/ip/stream_width, and prints the command); the clock must
# be the IP's, whose clock interface states it. Needs the PYNQ-Z2 board files
# (tul.com.tw:pynq-z2) in Vivado's board repository. The block design's cells are named
# sparsa (sparsa.protocol.IP_CELL: PYNQ's overlay.sparsa) and axi_dma
# (sparsa.protocol.DMA_CELL). Every connection is explicit (no connection automation):
#   PS7 M_AXI_GP0 -> axi_periph (AXI interconnect) -> M00: sparsa s_axi, M01: DMA S_AXI_LITE
#   DMA M_AXIS_MM2S -> sparsa s_axis;  sparsa m_axis -> DMA S_AXIS_S2MM
#   DMA M_AXI_MM2S -> axi_mem S00, DMA M_AXI_S2MM -> axi_mem S01 (SmartConnect) -> PS7 S_AXI_HP0
#   FCLK_CLK0 clocks everything; rst_ps7 (proc_sys_reset) from FCLK_RESET0_N gives the resets.

set script_dir [file dirname [file normalize [info script]]]
set name [expr {[llength $argv] > 0 ? [lindex $argv 0] : "sparsa"}]
set jobs [expr {[llength $argv] > 2 ? [lindex $argv 2] : 4}]
set build_dir $script_dir/build
set ip_dir $build_dir/ip
set part xc7z020clg400-1
set vivado_version 2022.1 ;# the PYNQ v3.0.1 image's; others may work, untried
set vlnv sparsa.dev:sparsa:sparsa_accel:1.0 ;# sparsa.protocol.IP_VLNV
set dma_length_width 26 ;# sparsa.host.jobs.DEFAULT_MAX_TRANSFER = 2**26 - 1
set register_base 0x40000000 ;# the IP's 4 KiB register window on GP0
set dma_base 0x40400000 ;# the DMA's control registers (64 KiB)
set ddr_range 512M ;# the PYNQ-Z2's DDR, all of it reachable by the DMA through HP0

if {[llength $argv] > 3} {
    set stream_bits [lindex $argv 3]
} elseif {[file exists $ip_dir/stream_width]} {
    set width_file [open $ip_dir/stream_width]
    set stream_bits [string trim [read $width_file]]
    close $width_file
} else {
    error "no stream width: pass it as the fourth argument, or run package_ip.tcl first"
}
if {![string is integer -strict $stream_bits] || $stream_bits < 8 || $stream_bits % 8} {
    error "stream width: expected a multiple of 8 bits, got '$stream_bits'"
}
set ip_clock 100
if {[file exists $ip_dir/clock_mhz]} {
    set clock_file [open $ip_dir/clock_mhz]
    set ip_clock [string trim [read $clock_file]]
    close $clock_file
}
set clock_mhz [expr {[llength $argv] > 1 ? [lindex $argv 1] : $ip_clock}]
if {![string is double -strict $clock_mhz] || $clock_mhz != $ip_clock} {
    error "clock: the IP was packaged for $ip_clock MHz, not '$clock_mhz': package it again with\
           package_ip.tcl -tclargs <sparsa_accel.v> $clock_mhz"
}
if {[version -short] ne $vivado_version} {
    puts "WARNING: these scripts target Vivado $vivado_version (the PYNQ v3.0.1 image's); this is Vivado [version -short]"
}

set board [lindex [get_board_parts -quiet -latest_file_version *pynq-z2*] 0]
if {$board eq ""} {
    error "PYNQ-Z2 board files not found: install them (github.com/Xilinx/XilinxBoardStore or\
           TUL's pynq-z2 board files) into Vivado's data/boards/board_files"
}
if {![file exists $ip_dir/component.xml]} {
    error "no packaged IP in $ip_dir: run package_ip.tcl first"
}

create_project -force $name $build_dir/$name -part $part
set_property board_part $board [current_project]
set_property ip_repo_paths $ip_dir [current_project]
update_ip_catalog
create_bd_design $name

# Zynq PS7 with the board's DDR/MIO preset (the only automation: it applies the board's
# preset), a GP master, an HP slave and FCLK_CLK0.
set ps [create_bd_cell -type ip -vlnv xilinx.com:ip:processing_system7 ps7]
apply_bd_automation -rule xilinx.com:bd_rule:processing_system7 \
    -config {make_external "FIXED_IO, DDR" apply_board_preset "1" Master "Disable" Slave "Disable"} $ps
set_property -dict [list CONFIG.PCW_USE_M_AXI_GP0 {1} CONFIG.PCW_USE_S_AXI_HP0 {1} \
    CONFIG.PCW_S_AXI_HP0_DATA_WIDTH {64} CONFIG.PCW_FPGA0_PERIPHERAL_FREQMHZ $clock_mhz] $ps

# The accelerator, a DMA of the IP's stream width, the interconnects and the reset block.
create_bd_cell -type ip -vlnv $vlnv sparsa
set dma [create_bd_cell -type ip -vlnv xilinx.com:ip:axi_dma axi_dma]
set_property -dict [list CONFIG.c_include_sg {0} CONFIG.c_sg_length_width $dma_length_width \
    CONFIG.c_m_axis_mm2s_tdata_width $stream_bits CONFIG.c_s_axis_s2mm_tdata_width $stream_bits \
    CONFIG.c_m_axi_mm2s_data_width [expr {max($stream_bits, 32)}] \
    CONFIG.c_m_axi_s2mm_data_width [expr {max($stream_bits, 32)}] \
    CONFIG.c_mm2s_burst_size {16} CONFIG.c_s2mm_burst_size {16}] $dma
set periph [create_bd_cell -type ip -vlnv xilinx.com:ip:axi_interconnect axi_periph]
set_property -dict [list CONFIG.NUM_SI {1} CONFIG.NUM_MI {2}] $periph
set mem [create_bd_cell -type ip -vlnv xilinx.com:ip:smartconnect axi_mem]
set_property -dict [list CONFIG.NUM_SI {2} CONFIG.NUM_MI {1}] $mem
create_bd_cell -type ip -vlnv xilinx.com:ip:proc_sys_reset rst_ps7

# Bus interfaces.
connect_bd_intf_net [get_bd_intf_pins ps7/M_AXI_GP0] [get_bd_intf_pins axi_periph/S00_AXI]
connect_bd_intf_net [get_bd_intf_pins axi_periph/M00_AXI] [get_bd_intf_pins sparsa/s_axi]
connect_bd_intf_net [get_bd_intf_pins axi_periph/M01_AXI] [get_bd_intf_pins axi_dma/S_AXI_LITE]
connect_bd_intf_net [get_bd_intf_pins axi_dma/M_AXIS_MM2S] [get_bd_intf_pins sparsa/s_axis]
connect_bd_intf_net [get_bd_intf_pins sparsa/m_axis] [get_bd_intf_pins axi_dma/S_AXIS_S2MM]
connect_bd_intf_net [get_bd_intf_pins axi_dma/M_AXI_MM2S] [get_bd_intf_pins axi_mem/S00_AXI]
connect_bd_intf_net [get_bd_intf_pins axi_dma/M_AXI_S2MM] [get_bd_intf_pins axi_mem/S01_AXI]
connect_bd_intf_net [get_bd_intf_pins axi_mem/M00_AXI] [get_bd_intf_pins ps7/S_AXI_HP0]

# One clock, FCLK_CLK0, for every clock pin (a loop: Vivado's Tcl 8.5 has no list map).
set clock_pins {
    ps7/M_AXI_GP0_ACLK ps7/S_AXI_HP0_ACLK rst_ps7/slowest_sync_clk
    axi_periph/ACLK axi_periph/S00_ACLK axi_periph/M00_ACLK axi_periph/M01_ACLK axi_mem/aclk
    axi_dma/s_axi_lite_aclk axi_dma/m_axi_mm2s_aclk axi_dma/m_axi_s2mm_aclk sparsa/aclk
}
proc pins {names} {
    set found {}
    foreach pin $names { lappend found [get_bd_pins $pin] }
    return $found
}
connect_bd_net [get_bd_pins ps7/FCLK_CLK0] {*}[pins $clock_pins]

# Resets: the PS's FCLK_RESET0_N through proc_sys_reset, synchronous to FCLK_CLK0.
connect_bd_net [get_bd_pins ps7/FCLK_RESET0_N] [get_bd_pins rst_ps7/ext_reset_in]
connect_bd_net [get_bd_pins rst_ps7/interconnect_aresetn] [get_bd_pins axi_periph/ARESETN]
set reset_pins {
    axi_periph/S00_ARESETN axi_periph/M00_ARESETN axi_periph/M01_ARESETN axi_mem/aresetn
    axi_dma/axi_resetn sparsa/aresetn
}
connect_bd_net [get_bd_pins rst_ps7/peripheral_aresetn] {*}[pins $reset_pins]

# Addresses: the register windows on GP0, all of DDR for both DMA masters through HP0.
assign_bd_address -offset $register_base -range 4K \
    -target_address_space [get_bd_addr_spaces ps7/Data] [get_bd_addr_segs sparsa/s_axi/reg0]
assign_bd_address -offset $dma_base -range 64K \
    -target_address_space [get_bd_addr_spaces ps7/Data] [get_bd_addr_segs axi_dma/S_AXI_LITE/Reg]
foreach space {Data_MM2S Data_S2MM} {
    assign_bd_address -offset 0x00000000 -range $ddr_range \
        -target_address_space [get_bd_addr_spaces axi_dma/$space] \
        [get_bd_addr_segs ps7/S_AXI_HP0/HP0_DDR_LOWOCM]
}
validate_bd_design
save_bd_design

set wrapper [make_wrapper -files [get_files $name.bd] -top]
add_files -norecurse $wrapper
set_property top ${name}_wrapper [current_fileset]
update_compile_order -fileset sources_1

launch_runs impl_1 -to_step route_design -jobs $jobs
wait_on_run impl_1
if {[get_property PROGRESS [get_runs impl_1]] ne "100%"} {
    error "implementation did not finish: see [get_property DIRECTORY [get_runs impl_1]]"
}
open_run impl_1
report_utilization -file $build_dir/${name}_utilization.txt
report_timing_summary -file $build_dir/${name}_timing.txt
set wns [get_property SLACK [get_timing_paths -max_paths 1 -nworst 1 -setup]]
set whs [get_property SLACK [get_timing_paths -max_paths 1 -nworst 1 -hold]]
puts "worst slack at $clock_mhz MHz: setup $wns ns, hold $whs ns"
if {$wns < 0 || $whs < 0} {
    puts [report_timing -delay_type min_max -max_paths 10 -slack_lesser_than 0 -return_string]
    set failed "timing not met at $clock_mhz MHz (setup $wns ns, hold $whs ns; the failing paths\
                above, all in $build_dir/${name}_timing.txt)"
    if {![info exists ::env(SPARSA_ALLOW_TIMING_FAILURE)] || $::env(SPARSA_ALLOW_TIMING_FAILURE) ne "1"} {
        error "$failed: no bitstream written; package and build at a lower clock"
    }
    puts "WARNING: $failed; writing the bitstream anyway (SPARSA_ALLOW_TIMING_FAILURE=1): it may compute wrong results"
}

# The pair pynq.Overlay loads: <name>.bit and <name>.hwh side by side.
write_bitstream -force $build_dir/$name.bit
set hwh [lindex [glob -nocomplain $build_dir/$name/$name.gen/sources_1/bd/$name/hw_handoff/$name.hwh \
                                  $build_dir/$name/$name.srcs/sources_1/bd/$name/hw_handoff/$name.hwh] 0]
if {$hwh eq ""} { error "no hardware handoff (.hwh) for $name" }
file copy -force $hwh $build_dir/$name.hwh
puts "wrote $build_dir/$name.bit and $build_dir/$name.hwh"
