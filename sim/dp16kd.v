// Simulation model of the Lattice ECP5 DP16KD block RAM, for sparsa's "ecp5" memory style only
// (hw/bram.py): both ports of one data width (1, 2, 4, 9 or 18 bits; 16K x 1 ... 1K x 18), the
// word address in ADx13 down to bit 0, 1, 2, 3 or 4 by the width, port A writing (WEA with
// CEA; in 18-bit mode ADA0 and ADA1 enable the low and high 9 bits) and port B reading (CEB
// loads the read data, and with REGMODE_B = "OUTREG" OCEB loads the output register after it).
// Not modelled: port A reading, port B writing, REGMODE_A = "OUTREG", chip selects other than
// 0b000 decodes of tied-low CS pins, resets (RSTA and RSTB are tied low). Any other setting
// stops the simulation at time 0 rather than simulate it wrongly; a write on port B stops it
// when it happens. A read of the word port A writes in the same cycle gives the old word.
module DP16KD(
  input DIA17, DIA16, DIA15, DIA14, DIA13, DIA12, DIA11, DIA10, DIA9, DIA8, DIA7, DIA6, DIA5, DIA4, DIA3, DIA2, DIA1, DIA0,
  input ADA13, ADA12, ADA11, ADA10, ADA9, ADA8, ADA7, ADA6, ADA5, ADA4, ADA3, ADA2, ADA1, ADA0,
  input CEA, OCEA, CLKA, WEA, RSTA,
  input CSA2, CSA1, CSA0,
  output DOA17, DOA16, DOA15, DOA14, DOA13, DOA12, DOA11, DOA10, DOA9, DOA8, DOA7, DOA6, DOA5, DOA4, DOA3, DOA2, DOA1, DOA0,
  input DIB17, DIB16, DIB15, DIB14, DIB13, DIB12, DIB11, DIB10, DIB9, DIB8, DIB7, DIB6, DIB5, DIB4, DIB3, DIB2, DIB1, DIB0,
  input ADB13, ADB12, ADB11, ADB10, ADB9, ADB8, ADB7, ADB6, ADB5, ADB4, ADB3, ADB2, ADB1, ADB0,
  input CEB, OCEB, CLKB, WEB, RSTB,
  input CSB2, CSB1, CSB0,
  output DOB17, DOB16, DOB15, DOB14, DOB13, DOB12, DOB11, DOB10, DOB9, DOB8, DOB7, DOB6, DOB5, DOB4, DOB3, DOB2, DOB1, DOB0
);
  parameter DATA_WIDTH_A = 18;
  parameter DATA_WIDTH_B = 18;
  parameter REGMODE_A = "NOREG";
  parameter REGMODE_B = "NOREG";
  parameter CSDECODE_A = "0b000";
  parameter CSDECODE_B = "0b000";
  /* verilator lint_off UNUSEDPARAM */
  parameter RESETMODE = "SYNC";
  parameter ASYNC_RESET_RELEASE = "SYNC";
  parameter WRITEMODE_A = "NORMAL";
  parameter WRITEMODE_B = "NORMAL";
  parameter GSR = "ENABLED";
  /* verilator lint_on UNUSEDPARAM */

  localparam W = DATA_WIDTH_A;
  localparam S = W == 1 ? 0 : W == 2 ? 1 : W == 4 ? 2 : W == 9 ? 3 : 4;
  localparam DEPTH = 1 << (14 - S);
  localparam OUT_REG = REGMODE_B == "OUTREG";

  initial begin
    if (!(W == 1 || W == 2 || W == 4 || W == 9 || W == 18) || DATA_WIDTH_B != W ||
        REGMODE_A != "NOREG" || !(REGMODE_B == "NOREG" || OUT_REG) ||
        CSDECODE_A != "0b000" || CSDECODE_B != "0b000") begin
      $display("DP16KD model: unsupported parameters");
      $finish;
    end
  end

  /* verilator lint_off UNUSEDSIGNAL */
  wire [17:0] dia = {DIA17, DIA16, DIA15, DIA14, DIA13, DIA12, DIA11, DIA10, DIA9, DIA8, DIA7, DIA6, DIA5, DIA4, DIA3, DIA2, DIA1, DIA0};
  wire [13:0] ada = {ADA13, ADA12, ADA11, ADA10, ADA9, ADA8, ADA7, ADA6, ADA5, ADA4, ADA3, ADA2, ADA1, ADA0};
  wire [13:0] adb = {ADB13, ADB12, ADB11, ADB10, ADB9, ADB8, ADB7, ADB6, ADB5, ADB4, ADB3, ADB2, ADB1, ADB0};
  wire [17:0] dib = {DIB17, DIB16, DIB15, DIB14, DIB13, DIB12, DIB11, DIB10, DIB9, DIB8, DIB7, DIB6, DIB5, DIB4, DIB3, DIB2, DIB1, DIB0};
  wire unused = &{OCEA, RSTA, RSTB, CSA2, CSA1, CSA0, CSB2, CSB1, CSB0, dib};
  /* verilator lint_on UNUSEDSIGNAL */

  // Words kept 18 bits wide, the bits above W zero.
  reg [17:0] memory [0:DEPTH-1];
  reg [17:0] read_q, out_q;
  wire [13-S:0] word_a = ada[13:S];
  wire [13-S:0] word_b = adb[13:S];
  // In 18-bit mode the low and high 9 bits are written as ADA0 and ADA1 say; else all W bits.
  wire [17:0] keep = W == 18 ? {{9{ADA1}}, {9{ADA0}}} : (18'd1 << W) - 18'd1;

  always @(posedge CLKA) begin
    if (CEA && WEA) memory[word_a] <= (memory[word_a] & ~keep) | (dia & keep);
  end

  always @(posedge CLKB) begin
    if (WEB) begin
      $display("DP16KD model: port B writes are not modelled");
      $finish;
    end
    if (CEB) read_q <= memory[word_b];
    if (OCEB) out_q <= read_q;
  end

  wire [17:0] dob = OUT_REG ? out_q : read_q;
  assign {DOB17, DOB16, DOB15, DOB14, DOB13, DOB12, DOB11, DOB10, DOB9, DOB8, DOB7, DOB6, DOB5, DOB4, DOB3, DOB2, DOB1, DOB0} = dob;
  assign {DOA17, DOA16, DOA15, DOA14, DOA13, DOA12, DOA11, DOA10, DOA9, DOA8, DOA7, DOA6, DOA5, DOA4, DOA3, DOA2, DOA1, DOA0} = 18'd0;
endmodule
