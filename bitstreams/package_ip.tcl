# Package sparsa's generated Verilog as a Vivado IP the PYNQ driver binds to.
#
#   sparsa verilog -o bitstreams/build/sparsa_accel.v            # any --rows/--cols/--stream-width
#   vivado -mode batch -source bitstreams/package_ip.tcl -tclargs bitstreams/build/sparsa_accel.v [<clock MHz>] [<ip_dir>]
#
# Writes the IP to bitstreams/build/ip (component.xml and the Verilog), packaged from a project
# on disk (bitstreams/build/ip_project). Vivado infers the bus interfaces from the port names:
# s_axi_* (AXI4-Lite slave), s_axis_* / m_axis_* (AXI4-Stream), aclk (clock) and aresetn
# (active-low reset). tests/test_bitstreams.py checks that the generated Verilog has every port
# and width named below, so this script and the RTL cannot drift apart. The clock (default 100
# MHz) is the clock interface's FREQ_HZ: the block design's FCLK must equal it (validate_bd_design
# checks it), so build_overlay.tcl takes it from here.

set script_dir [file dirname [file normalize [info script]]]
set verilog [file normalize [lindex $argv 0]]
set clock_mhz [expr {[llength $argv] > 1 ? [lindex $argv 1] : 100}]
set ip_dir [file normalize [expr {[llength $argv] > 2 ? [lindex $argv 2] : "$script_dir/build/ip"}]]
set part xc7z020clg400-1
# The Vivado release the PYNQ v3.0.1 image is built with; others may work, untried.
set vivado_version 2022.1

# The IP's identity: sparsa.protocol.IP_VLNV, which sparsa.host.board.SparsaIP binds to.
set vendor sparsa.dev
set library sparsa
set name sparsa_accel
set version 1.0
set top sparsa_accel

# Ports the interfaces are inferred from (name and width: W is the stream width, read off the
# generated Verilog's TDATA below, K = W / 8 its TKEEP; build_overlay.tcl sizes the DMA with W).
set axi_lite_ports {
    s_axi_awaddr 12 s_axi_awvalid 1 s_axi_awready 1 s_axi_wdata 32 s_axi_wstrb 4
    s_axi_wvalid 1 s_axi_wready 1 s_axi_bresp 2 s_axi_bvalid 1 s_axi_bready 1
    s_axi_araddr 12 s_axi_arvalid 1 s_axi_arready 1 s_axi_rdata 32 s_axi_rresp 2
    s_axi_rvalid 1 s_axi_rready 1
}
set stream_ports {
    s_axis_tdata W s_axis_tvalid 1 s_axis_tready 1 s_axis_tlast 1 s_axis_tkeep K
    m_axis_tdata W m_axis_tvalid 1 m_axis_tready 1 m_axis_tlast 1 m_axis_tkeep K
}
set clock_ports {aclk 1 aresetn 1}
set register_window 4096 ;# 2**12 bytes: sparsa.protocol.ADDRESS_WIDTH

if {![file exists $verilog]} {
    error "usage: vivado -mode batch -source package_ip.tcl -tclargs <sparsa_accel.v> \[clock MHz\] \[ip_dir\]"
}
if {![string is double -strict $clock_mhz] || $clock_mhz <= 0} {
    error "clock: expected a frequency in MHz, got '$clock_mhz'"
}
if {[version -short] ne $vivado_version} {
    puts "WARNING: these scripts target Vivado $vivado_version (the PYNQ v3.0.1 image's); this is Vivado [version -short]"
}
# The stream width (W above), from the Verilog's s_axis_tdata declaration: build_overlay.tcl
# sizes the DMA's streams with it.
set source [open $verilog]
set text [read $source]
close $source
if {![regexp {input\s*\[(\d+):0\]\s*s_axis_tdata\s*;} $text -> msb]} {
    error "$verilog declares no 'input \[W-1:0\] s_axis_tdata': is it sparsa's accelerator?"
}
set stream_bits [expr {$msb + 1}]
file mkdir $ip_dir
create_project -force ${name}_ip [file dirname $ip_dir]/ip_project -part $part
add_files -norecurse $verilog
set_property top $top [current_fileset]
update_compile_order -fileset sources_1

ipx::package_project -root_dir $ip_dir -vendor $vendor -library $library -taxonomy /UserIP \
    -import_files -set_current true
set core [ipx::current_core]
set_property name $name $core
set_property version $version $core
set_property display_name "sparsa INT8 GEMM accelerator" $core
set_property description "INT8 systolic-array GEMM with sparse-skip, bias, requantization, ReLU" $core
set_property supported_families {zynq Production artix7 Production kintex7 Production} $core

# Every interface the block design connects must have been inferred.
foreach busif {s_axi s_axis m_axis} {
    if {[ipx::get_bus_interfaces $busif -of_objects $core] eq ""} {
        error "interface $busif was not inferred: check the port names of $verilog"
    }
    ipx::associate_bus_interfaces -busif $busif -clock aclk $core
}
ipx::associate_bus_interfaces -clock aclk -reset aresetn $core
set reset [ipx::get_bus_interfaces aresetn -of_objects $core]
if {[ipx::get_bus_parameters POLARITY -of_objects $reset] eq ""} {  ;# Vivado infers it for *aresetn
    set_property value ACTIVE_LOW [ipx::add_bus_parameter POLARITY $reset]
}
# The clock's frequency, which the block design's FCLK must match.
set clock [ipx::get_bus_interfaces aclk -of_objects $core]
set frequency [ipx::get_bus_parameters FREQ_HZ -of_objects $clock]
if {$frequency eq ""} { set frequency [ipx::add_bus_parameter FREQ_HZ $clock] }
set_property value [expr {round($clock_mhz * 1e6)}] $frequency

# The register block: one 4 KiB window.
set map [ipx::get_memory_maps s_axi -of_objects $core]
if {$map eq ""} { set map [ipx::add_memory_map s_axi $core] }
set block [ipx::get_address_blocks -of_objects $map]
if {$block eq ""} { set block [ipx::add_address_block reg0 $map] }
set_property range $register_window $block
set_property slave_memory_map_ref s_axi [ipx::get_bus_interfaces s_axi -of_objects $core]

ipx::create_xgui_files $core
ipx::update_checksums $core
ipx::check_integrity $core
ipx::save_core $core
close_project
# What the block design takes from the packaged IP.
foreach {file value} [list stream_width $stream_bits clock_mhz $clock_mhz] {
    set out [open $ip_dir/$file w]
    puts $out $value
    close $out
}
puts "packaged $vendor:$library:$name:$version ($stream_bits-bit streams, $clock_mhz MHz) in $ip_dir"
puts "next: vivado -mode batch -source [file join $script_dir build_overlay.tcl] -tclargs sparsa $clock_mhz 4 $stream_bits"
