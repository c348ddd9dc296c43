import { EditorState } from '@codemirror/state';
import { language } from '@codemirror/language';
import { python } from '@codemirror/lang-python';
import { classHighlighter, highlightTree } from '@lezer/highlight';

import {
  GENERATE_CLASSES,
  generateCellHighlighting,
  generateHighlighter,
  generateLanguage,
  isGenerateCell
} from '../generate';

/** Each highlighted piece of `source` with its classes (ours and the standard tags' `tok-*`). */
function tokens(source: string): { text: string; classes: string }[] {
  const tree = generateLanguage.parser.parse(source);
  const found: { text: string; classes: string }[] = [];
  highlightTree(tree, [generateHighlighter, classHighlighter], (from, to, classes) => {
    found.push({ text: source.slice(from, to), classes });
  });
  return found;
}

function classesOf(source: string, text: string): string | null {
  const hit = tokens(source).find(token => token.text === text);
  return hit === undefined ? null : hit.classes;
}

const CELL = [
  '%%generate --max-tokens 64 --temperature 0.7 --out answers --regex \'[0-9]{4}\'',
  'Is 7 a prime and for what reason is it odd?',
  '---',
  'Write a haiku about {topic} and {{doubled}} braces, not {not a field}.',
  '  ---  ',
  'for x in range(3): if x is None and 2 > 1'
].join('\n');

describe('isGenerateCell', () => {
  it('takes a cell whose first non-blank line is the magic', () => {
    expect(isGenerateCell('%%generate\nhi')).toBe(true);
    expect(isGenerateCell('%%generate --max-tokens 8\nhi')).toBe(true);
    expect(isGenerateCell('\n  \n%%generate\nhi')).toBe(true);
    expect(isGenerateCell('%%generate')).toBe(true);
  });

  it('leaves other cells alone', () => {
    expect(isGenerateCell('%%generated\nhi')).toBe(false);
    expect(isGenerateCell('x = 1\n%%generate\nhi')).toBe(false);
    expect(isGenerateCell('%generate hi')).toBe(false);
    expect(isGenerateCell('# %%generate')).toBe(false);
    expect(isGenerateCell('')).toBe(false);
  });
});

describe('generateLanguage', () => {
  it('marks the magic, its options and their values on the first line', () => {
    expect(classesOf(CELL, '%%generate')).toContain(GENERATE_CLASSES.magic);
    expect(classesOf(CELL, '--max-tokens')).toContain(GENERATE_CLASSES.option);
    expect(classesOf(CELL, '--out')).toContain(GENERATE_CLASSES.option);
    expect(classesOf(CELL, '64')).toContain(GENERATE_CLASSES.value);
    expect(classesOf(CELL, '64')).toContain('tok-number');
    expect(classesOf(CELL, 'answers')).toContain(GENERATE_CLASSES.value);
    expect(classesOf(CELL, "'[0-9]{4}'")).toContain('tok-string');
  });

  it('leaves the prompts plain: no keyword, number or operator in them', () => {
    const firstLineEnd = CELL.indexOf('\n');
    const body = tokens(CELL).filter(token => CELL.indexOf(token.text, firstLineEnd) > firstLineEnd);
    for (const token of body) {
      expect(token.classes).not.toMatch(/tok-(keyword|number|operator|bool|atom|string)/);
    }
    const styled = body.map(token => token.text);
    for (const word of ['Is', '7', 'and', 'for', 'is', 'None', '2', '>', 'range']) {
      expect(styled).not.toContain(word);
    }
  });

  it('marks --- separators and {name} placeholders, not {{doubled}} or {spaced words}', () => {
    const pieces = tokens(CELL);
    const separators = pieces.filter(p => p.classes.includes(GENERATE_CLASSES.separator));
    expect(separators.map(p => p.text.trim())).toEqual(['---', '---']);
    const placeholders = pieces.filter(p => p.classes.includes(GENERATE_CLASSES.placeholder));
    expect(placeholders.map(p => p.text)).toEqual(['{topic}']);
  });

  it('reads the first non-blank line as the options line and a --- inside text as text', () => {
    const source = '\n%%generate --seed 1\n\nA --- B\n---\nC';
    expect(classesOf(source, '--seed')).toContain(GENERATE_CLASSES.option);
    const separators = tokens(source).filter(p => p.classes.includes(GENERATE_CLASSES.separator));
    expect(separators.map(p => p.text)).toEqual(['---']);
  });
});

describe('generateCellHighlighting', () => {
  const languageOf = (doc: string, mimeType?: string): string | null => {
    const state = EditorState.create({
      doc,
      extensions: generateCellHighlighting(mimeType === undefined ? undefined : { mimeType }, doc)
    });
    return state.facet(language)?.name ?? null;
  };

  it('gives a %%generate cell of a Python editor its own language, and nothing else', () => {
    expect(languageOf('%%generate\nhi and bye', 'text/x-ipython')).toBe('nbollama-generate');
    expect(languageOf('%%generate\nhi and bye', 'text/x-python')).toBe('nbollama-generate');
    expect(languageOf('%%generate\nhi and bye')).toBe('nbollama-generate');
    expect(languageOf('x = 1 and 2', 'text/x-ipython')).toBeNull();
    expect(languageOf('%%generate\nhi', 'text/x-ipythongfm')).toBeNull();
  });

  it('follows edits: the language comes and goes with the magic line', () => {
    let state = EditorState.create({ doc: 'x = 1', extensions: generateCellHighlighting() });
    expect(state.facet(language)).toBeNull();
    state = state.update({ changes: { from: 5, insert: ' and 2' } }).state;
    expect(state.facet(language)).toBeNull();
    state = state.update({ changes: { from: 0, insert: '%%generate\n' } }).state;
    expect(state.facet(language)).toBe(generateLanguage);
    state = state.update({ changes: { from: 11, insert: 'for and is 42\n' } }).state;
    expect(state.facet(language)).toBe(generateLanguage);
    state = state.update({ changes: { from: 0, to: 2 } }).state;
    expect(state.facet(language)).toBeNull();
  });

  it("wins over the editor's own Python, which keeps every other cell", () => {
    const nameOf = (doc: string): string | undefined =>
      EditorState.create({
        doc,
        extensions: [python(), generateCellHighlighting({ mimeType: 'text/x-ipython' }, doc)]
      }).facet(language)?.name;
    expect(nameOf('%%generate --seed 1\nfor and is 42')).toBe('nbollama-generate');
    expect(nameOf('for x in y:\n    pass')).toBe('python');
    expect(nameOf('%%timeit\nfor x in y: pass')).toBe('python');
  });
});
