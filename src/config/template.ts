// Text templates with {placeholders}: "cdn.ns-{namespace}.{base_domain}". Parsed once (at load,
// where a bad template is a configuration error), filled many times (once per row of a read).

/** Literal text at even indices, placeholder keys at odd ones: "a{x}b" is ["a", "x", "b"]. */
export type Template = readonly string[];

const PLACEHOLDER = /\{([A-Za-z_][A-Za-z0-9_]*)\}/y;

/** Parses `text`; returns an error message for a brace that is not part of a {placeholder}. */
export function parseTemplate(text: string): Template | string {
  const parts: string[] = [];
  let literal = '';
  for (let i = 0; i < text.length;) {
    const c = text[i];
    if (c === '{') {
      PLACEHOLDER.lastIndex = i;
      const m = PLACEHOLDER.exec(text);
      if (m === null) return `"{" at character ${i + 1} does not open a {placeholder} (a name of letters, digits and '_')`;
      parts.push(literal, m[1]);
      literal = '';
      i = PLACEHOLDER.lastIndex;
    } else if (c === '}') {
      return `"}" at character ${i + 1} closes no {placeholder}`;
    } else {
      literal += c;
      i++;
    }
  }
  parts.push(literal);
  return parts;
}

export function templateKeys(template: Template): string[] {
  return template.filter((_, i) => i % 2 === 1);
}

/** Fills every placeholder in one pass: a value that holds "{x}" is not filled again. */
export function fillTemplate(template: Template, values: Readonly<Record<string, string>>): string {
  let out = template[0];
  for (let i = 1; i < template.length; i += 2) out += values[template[i]] + template[i + 1];
  return out;
}
