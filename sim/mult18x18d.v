// Simulation model of the Lattice ECP5 MULT18X18D, for sparsa's "ecp5" DSP style only
// (hw/dsp.py): A and B registered or not (REG_INPUTA_CLK / REG_INPUTB_CLK "CLK0" or "NONE", with
// the clock enable named by REG_INPUT*_CE), no pipeline register, P registered or not
// (REG_OUTPUT_CLK, REG_OUTPUT_CE), SIGNEDA and SIGNEDB per product, no resets, cascades or C
// input; of the clock, enable and reset ports only CLK0, CE0, CE1 and RST0 (the ones sparsa
// connects; RST0 is tied low). Any other setting stops the simulation at time 0 rather than
// simulate it wrongly. The registers power up as 0.
module MULT18X18D(
  input A17, A16, A15, A14, A13, A12, A11, A10, A9, A8, A7, A6, A5, A4, A3, A2, A1, A0,
  input B17, B16, B15, B14, B13, B12, B11, B10, B9, B8, B7, B6, B5, B4, B3, B2, B1, B0,
  input C17, C16, C15, C14, C13, C12, C11, C10, C9, C8, C7, C6, C5, C4, C3, C2, C1, C0,
  input SIGNEDA, SIGNEDB, SOURCEA, SOURCEB,
  input CLK0, CE0, CE1, RST0,
  output P35, P34, P33, P32, P31, P30, P29, P28, P27, P26, P25, P24, P23, P22, P21, P20, P19, P18, P17, P16, P15, P14, P13, P12, P11, P10, P9, P8, P7, P6, P5, P4, P3, P2, P1, P0
);
  // The primitive's parameters, so any instance elaborates; the ones not modelled are checked
  // below where a value other than the default would change the behaviour.
  /* verilator lint_off UNUSEDPARAM */
  parameter REG_INPUTA_CLK = "NONE";
  parameter REG_INPUTA_CE = "CE0";
  parameter REG_INPUTA_RST = "RST0";
  parameter REG_INPUTB_CLK = "NONE";
  parameter REG_INPUTB_CE = "CE0";
  parameter REG_INPUTB_RST = "RST0";
  parameter REG_INPUTC_CLK = "NONE";
  parameter REG_INPUTC_CE = "CE0";
  parameter REG_INPUTC_RST = "RST0";
  parameter REG_PIPELINE_CLK = "NONE";
  parameter REG_PIPELINE_CE = "CE0";
  parameter REG_PIPELINE_RST = "RST0";
  parameter REG_OUTPUT_CLK = "NONE";
  parameter REG_OUTPUT_CE = "CE0";
  parameter REG_OUTPUT_RST = "RST0";
  parameter CLK0_DIV = "ENABLED";
  parameter CLK1_DIV = "ENABLED";
  parameter CLK2_DIV = "ENABLED";
  parameter CLK3_DIV = "ENABLED";
  parameter HIGHSPEED_CLK = "NONE";
  parameter GSR = "ENABLED";
  parameter CAS_MATCH_REG = "FALSE";
  parameter SOURCEB_MODE = "B_SHIFT";
  parameter MULT_BYPASS = "DISABLED";
  parameter RESETMODE = "SYNC";
  /* verilator lint_on UNUSEDPARAM */

  wire [17:0] a_in = {A17, A16, A15, A14, A13, A12, A11, A10, A9, A8, A7, A6, A5, A4, A3, A2, A1, A0};
  wire [17:0] b_in = {B17, B16, B15, B14, B13, B12, B11, B10, B9, B8, B7, B6, B5, B4, B3, B2, B1, B0};
  wire [1:0] ce = {CE1, CE0};

  function automatic integer ce_index(input [8*3-1:0] name);
    ce_index = name == "CE0" ? 0 : name == "CE1" ? 1 : -1;
  endfunction

  localparam A_REG = REG_INPUTA_CLK == "CLK0";
  localparam B_REG = REG_INPUTB_CLK == "CLK0";
  localparam P_REG = REG_OUTPUT_CLK == "CLK0";
  localparam A_CE = ce_index(REG_INPUTA_CE);
  localparam B_CE = ce_index(REG_INPUTB_CE);
  localparam P_CE = ce_index(REG_OUTPUT_CE);

  initial begin
    if ((REG_INPUTA_CLK != "NONE" && !A_REG) || (REG_INPUTB_CLK != "NONE" && !B_REG) ||
        (REG_OUTPUT_CLK != "NONE" && !P_REG) || REG_PIPELINE_CLK != "NONE" ||
        REG_INPUTC_CLK != "NONE" || MULT_BYPASS != "DISABLED" ||
        A_CE < 0 || B_CE < 0 || P_CE < 0) begin
      $display("MULT18X18D model: unsupported parameters");
      $finish;
    end
  end

  reg [17:0] a_q = 18'd0, b_q = 18'd0;
  reg [35:0] p_q = 36'd0;
  wire [17:0] a_used = A_REG ? a_q : a_in;
  wire [17:0] b_used = B_REG ? b_q : b_in;
  wire [35:0] a_wide = {{18{SIGNEDA & a_used[17]}}, a_used};
  wire [35:0] b_wide = {{18{SIGNEDB & b_used[17]}}, b_used};
  wire [35:0] product = a_wide * b_wide;

  always @(posedge CLK0) begin
    if (ce[A_CE]) a_q <= a_in;
    if (ce[B_CE]) b_q <= b_in;
    if (ce[P_CE]) p_q <= product;
  end

  assign {P35, P34, P33, P32, P31, P30, P29, P28, P27, P26, P25, P24, P23, P22, P21, P20, P19, P18, P17, P16, P15, P14, P13, P12, P11, P10, P9, P8, P7, P6, P5, P4, P3, P2, P1, P0} = P_REG ? p_q : product;
endmodule
