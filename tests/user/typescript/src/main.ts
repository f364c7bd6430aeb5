import { Circle, Color, Rect, Shape } from "./shapes";
import { formatRows, range, Row } from "./format";

const shapes: Shape[] = [new Circle(2), new Rect(3, 4), ...[...range(1, 4)].map((n) => new Rect(n, n + 1))];
const total = shapes.reduce((sum: number, s: Shape) => sum + s.area(), 0);
const rows: Row[] = shapes.map((s) => [s.name, s.area()] as const);
const unused = (x: number): number => x * 2; // dropped by tree shaking when minified
console.log(formatRows(rows));
console.log(`total ${total.toFixed(3)} ${Color.Green}`);
export { unused };
