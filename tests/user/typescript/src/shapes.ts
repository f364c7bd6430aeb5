export interface Shape { area(): number; name: string }
export class Circle implements Shape {
  constructor(private readonly r: number) {}
  name = "circle";
  area(): number { return Math.PI * this.r * this.r; }
}
export class Rect implements Shape {
  constructor(private w: number, private h: number) {}
  name = "rect";
  area(): number { return this.w * this.h; }
}
export enum Color { Red = "red", Green = "green" }
