-- Exercises the Lua features the process VM test compares against qemu-riscv64:
-- strings, tables, closures, coroutines, math, string.format with floats, errors.

local function counter()
  local n = 0
  return function() n = n + 1; return n end
end
local c1, c2 = counter(), counter()
c1(); c1()
print("closures", c1(), c2())

local t = {}
for i = 1, 50 do t[i] = (i * 37) % 101 end
table.sort(t, function(a, b) return a > b end)
print("sort", table.concat(t, ",", 1, 10))
local words = {}
for w in ("the quick brown fox jumps over the lazy dog"):gmatch("%a+") do
  words[#words + 1] = w:upper()
end
print("gmatch", #words, table.concat(words, " "))
print("gsub", (("hello world"):gsub("o", "0")), ("abc"):rep(3, "-"), ("Lua"):byte(1, -1))
print("find", ("key=value"):find("="), ("key=value"):match("(%w+)=(%w+)"))

local fib = coroutine.wrap(function()
  local a, b = 0, 1
  while true do coroutine.yield(a); a, b = b, a + b end
end)
local seq = {}
for _ = 1, 15 do seq[#seq + 1] = fib() end
print("coroutine", table.concat(seq, " "))

print("math", math.floor(-3.5), math.ceil(-3.5), math.max(3, 9, 1), math.abs(-7), 7 // 2, 7 % -3)
print("float", string.format("%.10f %e %g %g %5.2f", math.pi, 1 / 3, 2 ^ 0.5, 1e100, -0.125))
print("float2", math.sqrt(2), 0.1 + 0.2, 1e308 * 10, -(0 / 0) ~= -(0 / 0), 3 / 2, 2 ^ 63)
print("int", math.maxinteger, math.mininteger, math.maxinteger + 1 == math.mininteger, 1 << 62)
print("tostring", tostring(1e15), tostring(2^53), tostring(-0.0), 255 // 1.0, string.format("%x", 48879))
print("sin", string.format("%.12f %.12f %.12f", math.sin(1), math.cos(1), math.exp(1)))
print("log", string.format("%.12f %.12f", math.log(10), math.log(8, 2)), math.fmod(7.5, 2))

local ok, err = pcall(function() error({code = 42}) end)
print("pcall", ok, type(err), err.code)
print("pcall2", pcall(error, "boom", 0))
local mt = setmetatable({}, {__index = function(_, k) return k * 2 end,
                             __add = function(a, b) return "added" end})
print("metatable", mt[21], mt + mt)

local big = {}
for i = 1, 200 do big["k" .. i] = i end
local sum = 0
for _, v in pairs(big) do sum = sum + v end
print("table", sum, #big, next({}) == nil)
print("utf8", utf8.char(72, 228, 8364), utf8.len("häll€"))
print("string.format", string.format("%q", "a\nb\"c"), string.format("%-5s|%5s|", "ab", "cd"))
print("os", type(os.time()), type(os.clock()), os.getenv("POPEK_TEST_VAR"))
