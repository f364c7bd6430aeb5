/* Zicond for assemblers older than binutils 2.41 (Debian 12 has 2.40): czero.eqz and
 * czero.nez as the R-type words the specification gives them (OP, funct7 0000111,
 * funct3 101 and 111). run.py includes this in the rv64uzicond tests only. */
.macro czero.eqz rd, rs1, rs2
  .insn r 0x33, 5, 7, \rd, \rs1, \rs2
.endm
.macro czero.nez rd, rs1, rs2
  .insn r 0x33, 7, 7, \rd, \rs1, \rs2
.endm
