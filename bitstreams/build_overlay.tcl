# Build the PYNQ-Z2 overlay: Zynq PS7 + AXI DMA (simple mode) + the sparsa IP; writes
# bitstreams/build/<name>.bit and <name>.hwh, the pair pynq.Overlay loads.
#
#   vivado -mode batch -source bitstreams/package_ip.tcl -tclargs bitstreams/build/sparsa_accel.v
#   vivado -mode batch -source bitstreams/build_overlay.tcl [-tclargs <name> <clock MHz> <jobs>]
#
# Needs the PYNQ-Z2 board files (tul.com.tw:pynq-z2) in Vivado's board repository. The design:
#   PS7 M_AXI_GP0 -> AXI interconnect -> sparsa s_axi (registers) and the DMA's S_AXI_LITE
#   DMA M_AXIS_MM2S -> sparsa s_axis;  sparsa m_axis -> DMA S_AXIS_S2MM
#   DMA M_AXI_MM2S / M_AXI_S2MM -> PS7 S_AXI_HP0 (DDR)
#   FCLK_CLK0 clocks everything; a proc_sys_reset gives the active-low peripheral reset.

set script_dir [file dirname [file normalize [info script]]]
set name [expr {[llength $argv] > 0 ? [lindex $argv 0] : "sparsa"}]
set clock_mhz [expr {[llength $argv] > 1 ? [lindex $argv 1] : 100}]
set jobs [expr {[llength $argv] > 2 ? [lindex $argv 2] : 4}]
set build_dir $script_dir/build
set ip_dir $build_dir/ip
set part xc7z020clg400-1
set vlnv sparsa.dev:sparsa:sparsa_accel:1.0 ;# sparsa.protocol.IP_VLNV
set dma_length_width 26 ;# sparsa.host.jobs.DEFAULT_MAX_TRANSFER = 2**26 - 1

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

# Zynq PS7 with the board's DDR/MIO preset, a GP master, an HP slave and FCLK_CLK0.
set ps [create_bd_cell -type ip -vlnv xilinx.com:ip:processing_system7 ps7]
apply_bd_automation -rule xilinx.com:bd_rule:processing_system7 \
    -config {make_external "FIXED_IO, DDR" apply_board_preset "1" Master "Disable" Slave "Disable"} $ps
set_property -dict [list CONFIG.PCW_USE_M_AXI_GP0 {1} CONFIG.PCW_USE_S_AXI_HP0 {1} \
    CONFIG.PCW_FPGA0_PERIPHERAL_FREQMHZ $clock_mhz] $ps

# The accelerator, and a DMA whose stream width is the IP's.
set sparsa [create_bd_cell -type ip -vlnv $vlnv sparsa]
set tdata_bytes [get_property CONFIG.TDATA_NUM_BYTES [get_bd_intf_pins sparsa/s_axis]]
set stream_bits [expr {8 * $tdata_bytes}]
set dma [create_bd_cell -type ip -vlnv xilinx.com:ip:axi_dma axi_dma]
set_property -dict [list CONFIG.c_include_sg {0} CONFIG.c_sg_length_width $dma_length_width \
    CONFIG.c_m_axis_mm2s_tdata_width $stream_bits CONFIG.c_s_axis_s2mm_tdata_width $stream_bits \
    CONFIG.c_m_axi_mm2s_data_width [expr {max($stream_bits, 32)}] \
    CONFIG.c_m_axi_s2mm_data_width [expr {max($stream_bits, 32)}] \
    CONFIG.c_mm2s_burst_size {16} CONFIG.c_s2mm_burst_size {16}] $dma

connect_bd_intf_net [get_bd_intf_pins axi_dma/M_AXIS_MM2S] [get_bd_intf_pins sparsa/s_axis]
connect_bd_intf_net [get_bd_intf_pins sparsa/m_axis] [get_bd_intf_pins axi_dma/S_AXIS_S2MM]

# Register paths from the GP port, memory paths to the HP port; the automation adds the
# interconnects, the proc_sys_reset and the clock nets.
set clocks {Clk_master Auto Clk_slave Auto Clk_xbar Auto}
foreach slave {/sparsa/s_axi /axi_dma/S_AXI_LITE} {
    apply_bd_automation -rule xilinx.com:bd_rule:axi4 \
        -config [list {*}$clocks Master /ps7/M_AXI_GP0 Slave $slave intc_ip {New AXI Interconnect}] \
        [get_bd_intf_pins $slave]
}
foreach master {/axi_dma/M_AXI_MM2S /axi_dma/M_AXI_S2MM} {
    apply_bd_automation -rule xilinx.com:bd_rule:axi4 \
        -config [list {*}$clocks Master $master Slave /ps7/S_AXI_HP0 intc_ip {Auto}] \
        [get_bd_intf_pins /ps7/S_AXI_HP0]
}
set reset [get_bd_cells -filter {VLNV =~ "*:proc_sys_reset:*"}]
if {[get_bd_nets -quiet -of_objects [get_bd_pins sparsa/aclk]] eq ""} {
    connect_bd_net [get_bd_pins ps7/FCLK_CLK0] [get_bd_pins sparsa/aclk]
}
if {[get_bd_nets -quiet -of_objects [get_bd_pins sparsa/aresetn]] eq ""} {
    connect_bd_net [get_bd_pins $reset/peripheral_aresetn] [get_bd_pins sparsa/aresetn]
}

assign_bd_address
validate_bd_design
save_bd_design

set wrapper [make_wrapper -files [get_files $name.bd] -top]
add_files -norecurse $wrapper
set_property top ${name}_wrapper [current_fileset]
update_compile_order -fileset sources_1

launch_runs impl_1 -to_step write_bitstream -jobs $jobs
wait_on_run impl_1
if {[get_property PROGRESS [get_runs impl_1]] ne "100%"} {
    error "implementation did not finish: see [get_property DIRECTORY [get_runs impl_1]]"
}
open_run impl_1
set wns [get_property SLACK [get_timing_paths -max_paths 1 -nworst 1 -setup]]
puts "worst setup slack at $clock_mhz MHz: $wns ns"
report_utilization -file $build_dir/${name}_utilization.txt
report_timing_summary -file $build_dir/${name}_timing.txt

# The pair pynq.Overlay loads: <name>.bit and <name>.hwh side by side.
file copy -force [get_property DIRECTORY [get_runs impl_1]]/${name}_wrapper.bit $build_dir/$name.bit
set hwh [lindex [glob -nocomplain $build_dir/$name/$name.gen/sources_1/bd/$name/hw_handoff/$name.hwh \
                                  $build_dir/$name/$name.srcs/sources_1/bd/$name/hw_handoff/$name.hwh] 0]
if {$hwh eq ""} { error "no hardware handoff (.hwh) for $name" }
file copy -force $hwh $build_dir/$name.hwh
puts "wrote $build_dir/$name.bit and $build_dir/$name.hwh"
if {$wns < 0} { puts "WARNING: timing not met at $clock_mhz MHz (WNS $wns ns); try a lower clock" }
