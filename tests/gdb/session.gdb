# One gdb session, run against popek and against QEMU: breakpoints at a function and
# inside blocks every tier has already translated (mix runs hot in warm() first), steps,
# register and memory reads and a memory write, then on to the end.
break work
continue
info registers pc ra sp gp a0 a1 a2 a3 a4 a5 s0 s1
break *mix+4
continue
info registers pc a0 a1 a5
stepi
stepi
info registers pc a0 a1 a5
continue
info registers pc a0 a1 a5
delete
tbreak finish
continue
info registers pc a0 a1 a2 a5 sp ra
x/2xg &counter
set var counter = 1000
p counter
stepi
p/x $pc
continue
