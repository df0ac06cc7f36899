package main

// The tags Ollama reads off a template to parse a model's output (our code, after the behaviour of
// github.com/ollama/ollama thinking/template.go InferTags and tools/template.go parseTag).

import (
	"bytes"
	"strings"
	"text/template"
	"text/template/parse"
)

func visit(n parse.Node, enter func(parse.Node) bool, exit func(parse.Node)) {
	if n == nil || !enter(n) {
		return
	}
	switch x := n.(type) {
	case *parse.ListNode:
		for _, c := range x.Nodes {
			visit(c, enter, exit)
		}
	case *parse.BranchNode:
		if x.Pipe != nil {
			visit(x.Pipe, enter, exit)
		}
		if x.List != nil {
			visit(x.List, enter, exit)
		}
		if x.ElseList != nil {
			visit(x.ElseList, enter, exit)
		}
	case *parse.ActionNode:
		visit(x.Pipe, enter, exit)
	case *parse.WithNode:
		visit(&x.BranchNode, enter, exit)
	case *parse.RangeNode:
		visit(&x.BranchNode, enter, exit)
	case *parse.IfNode:
		visit(&x.BranchNode, enter, exit)
	case *parse.TemplateNode:
		visit(x.Pipe, enter, exit)
	case *parse.PipeNode:
		for _, c := range x.Cmds {
			visit(c, enter, exit)
		}
	case *parse.CommandNode:
		for _, a := range x.Args {
			visit(a, enter, exit)
		}
	}
	if exit != nil {
		exit(n)
	}
}

// inferThinkTags: for each {{ .Thinking }} inside a range over .Messages, the first and last text nodes of the
// nearest enclosing list are the opening and closing thinking tags (trimmed).
func inferThinkTags(t *template.Template) (string, string) {
	var ancestors []parse.Node
	open, close := "", ""
	enter := func(n parse.Node) bool {
		ancestors = append(ancestors, n)
		f, ok := n.(*parse.FieldNode)
		if !ok || len(f.Ident) == 0 || f.Ident[0] != "Thinking" {
			return true
		}
		var rng *parse.RangeNode
		for i := len(ancestors) - 1; i >= 0 && rng == nil; i-- {
			rng, _ = ancestors[i].(*parse.RangeNode)
		}
		if rng == nil || !rangeUsesMessages(rng) {
			return true
		}
		for i := len(ancestors) - 1; i >= 0; i-- {
			if l, ok := ancestors[i].(*parse.ListNode); ok {
				if tn, ok := l.Nodes[0].(*parse.TextNode); ok {
					open = strings.TrimSpace(tn.String())
				}
				if tn, ok := l.Nodes[len(l.Nodes)-1].(*parse.TextNode); ok {
					close = strings.TrimSpace(tn.String())
				}
				break
			}
		}
		return true
	}
	exit := func(parse.Node) { ancestors = ancestors[:len(ancestors)-1] }
	visit(t.Root, enter, exit)
	return open, close
}

func rangeUsesMessages(r *parse.RangeNode) bool {
	found := false
	visit(r.BranchNode.Pipe, func(n parse.Node) bool {
		if f, ok := n.(*parse.FieldNode); ok && f.Ident[0] == "Messages" {
			found = true
		}
		return true
	}, nil)
	return found
}

// toolTag: the first non-blank text inside the first {{ if .ToolCalls }}, cut before "{" and trimmed; "{" when
// there is none (Ollama then parses any JSON object the model writes as a tool call).
func toolTag(t *template.Template) string {
	ifNode := findToolCallsIf(t.Tree.Root.Nodes)
	if ifNode == nil {
		return "{"
	}
	tn := firstText(ifNode.List.Nodes)
	if tn == nil {
		return "{"
	}
	tag := strings.ReplaceAll(string(tn.Text), "\r\n", "\n")
	tag, _, _ = strings.Cut(tag, "{")
	if tag = strings.TrimSpace(tag); tag == "" {
		return "{"
	}
	return tag
}

func findToolCallsIf(nodes []parse.Node) *parse.IfNode {
	for _, node := range nodes {
		var lists []*parse.ListNode
		switch n := node.(type) {
		case *parse.IfNode:
			for _, cmd := range n.Pipe.Cmds {
				for _, arg := range cmd.Args {
					if f, ok := arg.(*parse.FieldNode); ok && contains(f.Ident, "ToolCalls") {
						return n
					}
				}
			}
			lists = []*parse.ListNode{n.List, n.ElseList}
		case *parse.ListNode:
			lists = []*parse.ListNode{n}
		case *parse.RangeNode:
			lists = []*parse.ListNode{n.List, n.ElseList}
		case *parse.WithNode:
			lists = []*parse.ListNode{n.List, n.ElseList}
		}
		for _, l := range lists {
			if l != nil {
				if found := findToolCallsIf(l.Nodes); found != nil {
					return found
				}
			}
		}
	}
	return nil
}

func firstText(nodes []parse.Node) *parse.TextNode {
	for _, node := range nodes {
		switch n := node.(type) {
		case *parse.TextNode:
			if len(bytes.TrimSpace(n.Text)) > 0 {
				return n
			}
		case *parse.IfNode:
			return firstTextIn(n.List, n.ElseList)
		case *parse.RangeNode:
			return firstTextIn(n.List, n.ElseList)
		case *parse.WithNode:
			return firstTextIn(n.List, n.ElseList)
		case *parse.ListNode:
			if tn := firstText(n.Nodes); tn != nil {
				return tn
			}
		case *parse.ActionNode:
			return nil
		}
	}
	return nil
}

func firstTextIn(list, elseList *parse.ListNode) *parse.TextNode {
	if tn := firstText(list.Nodes); tn != nil {
		return tn
	}
	if elseList != nil {
		return firstText(elseList.Nodes)
	}
	return nil
}
